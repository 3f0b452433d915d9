//! The invariant checkers. The world feeds them [`Observation`]s as things happen (an entry
//! applied on a replica, a node starting to act as a room's host, a client's acknowledged
//! write, a resume judged) and calls [`Checker::after_step`] after every step for the checks
//! that look at the whole world. Each broken invariant becomes a typed [`Violation`] with the
//! step, the virtual time and what is needed to debug it.
//!
//! # The reference log
//!
//! The first replica to apply an index defines it: its `(term, bytes)` enter the reference
//! log and are applied, with the real [`StateMachine`], to a reference state. Every later apply
//! of that index on any replica must carry the same bytes, and every replica's state must hash
//! to the reference digest at its applied index. (A replica applying index `i` has applied
//! `i - 1`, by entries or by a snapshot taken from a replica that applied it, so the reference
//! sees every index in order.) The reference also records the history the other checks need:
//! which node each room epoch was placed on, and every viewer state written or removed.
//!
//! # The checks
//!
//! | checker | invariant |
//! |---|---|
//! | `two-leaders` | at most one leader per term |
//! | `log-divergence` | an index applies with the same term and bytes everywhere |
//! | `digest-mismatch` | replicas at equal applied index have equal state (this is also the "expiry identical on all replicas" check: expiry is replicated as `ExpireViewers`) |
//! | `expired-early` | an expiry removes no viewer before its deadline (by the latest clock) |
//! | `acked-write-lost` | an acknowledged viewer write committed as acknowledged, and stays visible until a committed delete or expiry (which discharges it: a state that reappears later is not it); a later write may supersede it but not put an older playback position back |
//! | `two-hosts` / `host-not-placed` | at most one node acts as host per room epoch, and only the node the committed directory named for it |
//! | `epoch-lineage` | a migration's flip moves the room from exactly the epoch its handoff carried: the new host got the previous epoch's state |
//! | `no-live-host` | after the heal, a room with connected viewers is without a live host for at most [`LIVENESS_BOUND_MS`] |
//! | `stale-host` | after the heal, a node acting as host under an epoch the directory no longer gives it stops within [`LIVENESS_BOUND_MS`] (no viewer gets media from two hosts) |
//! | `resume-refused` / `resume-stale` / `resume-outside-window` | a resume inside the window gets the latest acknowledged state back; outside it, a fresh session |
//! | `migration-stuck` | a migration ends within [`MIGRATION_BOUND_MS`] after the heal |
//! | `shell-error` | the shell never meets an impossible storage or snapshot condition |

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use mediamesh_cluster::codec::{self, ENTRY_BYTES_MAX};
use mediamesh_cluster::command::{Command, EntryPayload, Outcome};
use mediamesh_cluster::state_machine::StateMachine;
use mediamesh_cluster::types::ViewerState;
use mediamesh_cluster::{NodeId, RoomId, ViewerId};
use raft::eraftpb::EntryType;

use crate::config::{
    CLOCK_BASE_MS, CLOCK_SKEW_MAX_MS, LIVENESS_BOUND_MS, MIGRATION_BOUND_MS, RESUME_WINDOW_MS, STEP_MS,
};
use crate::control::RoomMode;
use crate::message::{ClientId, NodeIndex, ResumeOutcome};
use crate::node::{Node, Roster};

/// Where a `PlaceRoom` came from (told by the node that issued it; the checkers match it to
/// the committed command through the entry's `(proposer, batch_id)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaceKind {
    /// The directory placed a room (new, or its host read as dead).
    Place,
    /// The leader's failover re-placed a dead node's room.
    Failover,
    /// A migration's flip; the handoff carried the room at `handoff_epoch`.
    Migration { from: NodeId, handoff_epoch: u64 },
}

/// The callers of one proposed entry: `(origin node, op, commands)` each, in order.
pub type Callers = Vec<(NodeIndex, u64, usize)>;

/// Something that happened, for the checkers.
// Observations are moved once from where they happen into the checker; boxing the large
// variants would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Observation {
    /// A replica applied an entry.
    Applied {
        node: NodeIndex,
        index: u64,
        term: u64,
        entry_type: EntryType,
        data: Vec<u8>,
    },
    /// A replica installed a snapshot.
    SnapshotInstalled { node: NodeIndex, index: u64 },
    /// The leader proposed an entry: `(origin node, op, commands)` per caller, in order.
    BatchProposed {
        proposer: u64,
        batch_id: u64,
        callers: Callers,
    },
    /// Node `origin`'s op `op` is a `PlaceRoom` of this kind.
    PlaceIntent {
        origin: NodeIndex,
        op: u64,
        kind: PlaceKind,
    },
    /// A node started acting as the room's host under `epoch`.
    HostActing { node: NodeIndex, room: RoomId, epoch: u64 },
    /// A node stopped hosting the room (demoted or closed).
    HostStopped { node: NodeIndex, room: RoomId, epoch: u64 },
    /// A migration target took the room's handoff at `epoch`.
    HandoffTaken { node: NodeIndex, room: RoomId, epoch: u64 },
    /// A migration started on its source.
    MigrationStarted {
        node: NodeIndex,
        migration: u64,
        room: RoomId,
        epoch: u64,
        to: NodeId,
    },
    /// A migration finished (moved or failed).
    MigrationFinished { node: NodeIndex, migration: u64 },
    /// A node went down (crash or leave): its volatile work ended.
    NodeDown { node: NodeIndex },
    /// The shell met an impossible condition.
    ShellError { node: NodeIndex, detail: String },
    /// The world hit one of its own limits (a simulator bug).
    WorldError { detail: String },
    /// A client got an acknowledgement for this committed viewer state.
    Acked { client: ClientId, state: ViewerState },
    /// A node judged a client's resume. `acked` is the client's latest acknowledged state of
    /// that viewer.
    ResumeJudged {
        client: ClientId,
        viewer: ViewerId,
        acked: Option<ViewerState>,
        outcome: ResumeOutcome,
        read_clock_ms: u64,
    },
}

/// Where in the run a violation was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// Step number.
    pub step: u64,
    /// Virtual time.
    pub now_ms: u64,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} (t={} ms)", self.step, self.now_ms)
    }
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("{at}: two leaders in term {term}: {first} and {second}")]
    TwoLeaders {
        at: At,
        term: u64,
        first: NodeId,
        second: NodeId,
    },
    #[error(
        "{at}: {node} applied index {index} as term {found_term} ({found_bytes} bytes), but it committed as term {term} ({bytes} bytes)"
    )]
    LogDivergence {
        at: At,
        node: NodeId,
        index: u64,
        term: u64,
        bytes: usize,
        found_term: u64,
        found_bytes: usize,
    },
    #[error("{at}: {node} at applied index {index} has state digest {found}, the reference has {expected}")]
    DigestMismatch {
        at: At,
        node: NodeId,
        index: u64,
        expected: String,
        found: String,
    },
    #[error(
        "{at}: expiry at index {index} removed {viewer} whose deadline {expires_at_ms} is after every clock ({latest_clock_ms})"
    )]
    ExpiredEarly {
        at: At,
        index: u64,
        viewer: ViewerId,
        expires_at_ms: u64,
        latest_clock_ms: u64,
    },
    #[error("{at}: acknowledged write of {viewer} at revision {revision} lost: {detail}")]
    AckedWriteLost {
        at: At,
        viewer: ViewerId,
        revision: u64,
        detail: String,
    },
    #[error("{at}: {room} epoch {epoch} has two hosts: {first} and {second}")]
    TwoHosts {
        at: At,
        room: RoomId,
        epoch: u64,
        first: NodeId,
        second: NodeId,
    },
    #[error("{at}: {node} acts as host of {room} at epoch {epoch}, which the directory gave to {placed:?}")]
    HostNotPlaced {
        at: At,
        room: RoomId,
        epoch: u64,
        node: NodeId,
        placed: Option<NodeId>,
    },
    #[error(
        "{at}: {room} epoch {epoch} went to {host} by a migration from {from} whose handoff carried epoch {handoff_epoch}: the host of epoch {epoch} never got epoch {previous}'s state (held by {previous_host:?})"
    )]
    EpochLineage {
        at: At,
        room: RoomId,
        epoch: u64,
        host: NodeId,
        from: NodeId,
        handoff_epoch: u64,
        previous: u64,
        previous_host: Option<NodeId>,
    },
    #[error(
        "{at}: {room} has had {viewers} connected viewers and no live host since t={since_ms} ms (bound {LIVENESS_BOUND_MS} ms after the heal): {detail}"
    )]
    NoLiveHost {
        at: At,
        room: RoomId,
        viewers: usize,
        since_ms: u64,
        detail: String,
    },
    #[error(
        "{at}: {node} still acts as host of {room} at epoch {epoch} since t={since_ms} ms (bound {LIVENESS_BOUND_MS} ms after the heal) while the directory holds {placement}"
    )]
    StaleHost {
        at: At,
        node: NodeId,
        room: RoomId,
        epoch: u64,
        since_ms: u64,
        placement: String,
    },
    #[error(
        "{at}: resume of {viewer} refused inside the window (acknowledged revision {revision} is {age_ms} ms old): {detail}"
    )]
    ResumeRefused {
        at: At,
        viewer: ViewerId,
        revision: u64,
        age_ms: u64,
        detail: String,
    },
    #[error("{at}: resume of {viewer} got revision {got} back, older than the acknowledged {acked}")]
    ResumeStale {
        at: At,
        viewer: ViewerId,
        got: u64,
        acked: u64,
    },
    #[error("{at}: resume of {viewer} took back a state {age_ms} ms old (window {RESUME_WINDOW_MS} ms)")]
    ResumeOutsideWindow { at: At, viewer: ViewerId, age_ms: u64 },
    #[error(
        "{at}: migration m{migration} of {room} on {node} (started t={started_ms} ms) has not finished {MIGRATION_BOUND_MS} ms after the heal; its core is in phase {phase}"
    )]
    MigrationStuck {
        at: At,
        node: NodeId,
        migration: u64,
        room: RoomId,
        started_ms: u64,
        phase: String,
    },
    #[error("{at}: {node}: {detail}")]
    ShellError { at: At, node: NodeId, detail: String },
}

impl Violation {
    /// The checker's name (stable: tests and the summary use it).
    pub fn checker(&self) -> &'static str {
        match self {
            Violation::TwoLeaders { .. } => "two-leaders",
            Violation::LogDivergence { .. } => "log-divergence",
            Violation::DigestMismatch { .. } => "digest-mismatch",
            Violation::ExpiredEarly { .. } => "expired-early",
            Violation::AckedWriteLost { .. } => "acked-write-lost",
            Violation::TwoHosts { .. } => "two-hosts",
            Violation::HostNotPlaced { .. } => "host-not-placed",
            Violation::EpochLineage { .. } => "epoch-lineage",
            Violation::NoLiveHost { .. } => "no-live-host",
            Violation::StaleHost { .. } => "stale-host",
            Violation::ResumeRefused { .. } => "resume-refused",
            Violation::ResumeStale { .. } => "resume-stale",
            Violation::ResumeOutsideWindow { .. } => "resume-outside-window",
            Violation::MigrationStuck { .. } => "migration-stuck",
            Violation::ShellError { .. } => "shell-error",
        }
    }
}

/// What the checkers counted (for the summary and for tuning the bounds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Entries in the reference log.
    pub entries: u64,
    /// Replica states compared with the reference digest.
    pub digests_compared: u64,
    /// Acknowledged writes checked.
    pub acks: u64,
    /// Resumes taken back inside the window.
    pub resumes_resumed: u64,
    /// Resumes refused (outside the window, or no state).
    pub resumes_expired: u64,
    /// Resumes whose read failed (no quorum in time).
    pub resumes_unreadable: u64,
    /// Viewer states removed by expiry.
    pub expired: u64,
    /// Placements committed by migrations.
    pub flips: u64,
    /// Placements committed by failover.
    pub failovers: u64,
    /// Longest time after the heal a room with viewers went without a live host.
    pub host_gap_max_ms: u64,
}

struct RunningMigration {
    room: RoomId,
    started_ms: u64,
}

/// The checkers' state for one run.
pub struct Checker {
    roster: Rc<Roster>,
    heal_ms: Option<u64>,
    /// Committed entries by index: term, type, bytes.
    log: BTreeMap<u64, (u64, EntryType, Vec<u8>)>,
    reference: StateMachine,
    digests: BTreeMap<u64, String>,
    placements: BTreeMap<(RoomId, u64), NodeId>,
    batches: BTreeMap<(u64, u64), Callers>,
    intents: BTreeMap<(NodeIndex, u64), PlaceKind>,
    /// Per viewer: what each committed index did to it (`Some`: written, `None`: removed).
    viewer_history: BTreeMap<ViewerId, BTreeMap<u64, Option<ViewerState>>>,
    acked: BTreeMap<ViewerId, ViewerState>,
    acks_dirty: bool,
    leaders: BTreeMap<u64, NodeIndex>,
    hosts: BTreeMap<(RoomId, u64), NodeIndex>,
    migrations: BTreeMap<(NodeIndex, u64), RunningMigration>,
    host_gap_since: BTreeMap<RoomId, u64>,
    stale_since: BTreeMap<(NodeIndex, RoomId), u64>,
    digest_checked: Vec<u64>,
    violations: Vec<Violation>,
    /// What the checkers counted.
    pub stats: CheckStats,
}

impl Checker {
    /// The checkers for a run over `roster`, starting from `initial` (the bootstrap state).
    pub fn new(roster: Rc<Roster>, initial: StateMachine, heal_ms: Option<u64>) -> Self {
        let mut digests = BTreeMap::new();
        digests.insert(initial.applied().index, initial.digest());
        let nodes = roster.nodes.len();
        Checker {
            roster,
            heal_ms,
            log: BTreeMap::new(),
            reference: initial,
            digests,
            placements: BTreeMap::new(),
            batches: BTreeMap::new(),
            intents: BTreeMap::new(),
            viewer_history: BTreeMap::new(),
            acked: BTreeMap::new(),
            acks_dirty: false,
            leaders: BTreeMap::new(),
            hosts: BTreeMap::new(),
            migrations: BTreeMap::new(),
            host_gap_since: BTreeMap::new(),
            stale_since: BTreeMap::new(),
            digest_checked: vec![0; nodes],
            violations: Vec::new(),
            stats: CheckStats::default(),
        }
    }

    /// Violations found so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The committed directory (reference state).
    pub fn reference(&self) -> &StateMachine {
        &self.reference
    }

    fn name(&self, node: NodeIndex) -> NodeId {
        self.roster.nodes[node].id.clone()
    }

    /// Feeds one observation.
    pub fn observe(&mut self, at: At, observation: Observation) {
        match observation {
            Observation::Applied {
                node,
                index,
                term,
                entry_type,
                data,
            } => self.applied(at, node, index, term, entry_type, data),
            Observation::SnapshotInstalled { node, index } => {
                // Checked with the digests after the step.
                let _ = (node, index);
            }
            Observation::BatchProposed {
                proposer,
                batch_id,
                callers,
            } => {
                self.batches.insert((proposer, batch_id), callers);
            }
            Observation::PlaceIntent { origin, op, kind } => {
                self.intents.insert((origin, op), kind);
            }
            Observation::HostActing { node, room, epoch } => self.host_acting(at, node, room, epoch),
            Observation::HostStopped { .. } | Observation::HandoffTaken { .. } => {}
            Observation::MigrationStarted {
                node, migration, room, ..
            } => {
                self.migrations.insert(
                    (node, migration),
                    RunningMigration {
                        room,
                        started_ms: at.now_ms,
                    },
                );
            }
            Observation::MigrationFinished { node, migration } => {
                self.migrations.remove(&(node, migration));
            }
            Observation::NodeDown { node } => {
                self.migrations.retain(|(n, _), _| *n != node);
            }
            Observation::ShellError { node, detail } => {
                let node = self.name(node);
                self.violations.push(Violation::ShellError { at, node, detail });
            }
            Observation::WorldError { detail } => {
                let node = NodeId::from("world");
                self.violations.push(Violation::ShellError { at, node, detail });
            }
            Observation::Acked { state, .. } => self.acked(at, state),
            Observation::ResumeJudged {
                viewer,
                acked,
                outcome,
                read_clock_ms,
                ..
            } => self.resume_judged(at, viewer, acked, outcome, read_clock_ms),
        }
    }

    fn applied(&mut self, at: At, node: NodeIndex, index: u64, term: u64, entry_type: EntryType, data: Vec<u8>) {
        if let Some((t, ty, bytes)) = self.log.get(&index) {
            if *t != term || *ty != entry_type || *bytes != data {
                let (committed_term, committed_bytes) = (*t, bytes.len());
                let node = self.name(node);
                self.violations.push(Violation::LogDivergence {
                    at,
                    node,
                    index,
                    term: committed_term,
                    bytes: committed_bytes,
                    found_term: term,
                    found_bytes: data.len(),
                });
            }
            return;
        }
        self.log.insert(index, (term, entry_type, data));
        // Apply every contiguous committed entry to the reference.
        loop {
            let next = self.reference.applied().index + 1;
            let Some((term, entry_type, data)) = self.log.get(&next).cloned() else {
                break;
            };
            self.apply_reference(at, next, term, entry_type, &data);
        }
    }

    /// Applies one committed entry to the reference exactly as the shell does, recording the
    /// placement and viewer history and checking lineage and expiry.
    fn apply_reference(&mut self, at: At, index: u64, term: u64, entry_type: EntryType, data: &[u8]) {
        self.stats.entries += 1;
        let payload = match entry_type {
            EntryType::EntryNormal if !data.is_empty() => codec::decode::<EntryPayload, ENTRY_BYTES_MAX>(data).ok(),
            _ => None,
        };
        let Some(payload) = payload else {
            self.reference.apply_empty(index, term);
            self.digests.insert(index, self.reference.digest());
            return;
        };
        // Viewers an expiry or a delete may remove, as they were before the entry.
        let mut before: BTreeMap<ViewerId, ViewerState> = BTreeMap::new();
        for command in &payload.commands {
            let named: Vec<&ViewerId> = match command {
                Command::ExpireViewers { viewers } => viewers.iter().map(|(v, _)| v).collect(),
                Command::DeleteViewer { viewer } => vec![viewer],
                _ => Vec::new(),
            };
            for v in named {
                if let Some(state) = self.reference.viewers().get(v) {
                    before.insert(v.clone(), state.clone());
                }
            }
        }
        let outcomes = self.reference.apply(index, term, payload.commands.clone());
        let origins = self.batches.remove(&(payload.proposer, payload.batch_id));
        for (position, (command, outcome)) in payload.commands.iter().zip(&outcomes).enumerate() {
            match (command, outcome) {
                (Command::PlaceRoom { .. }, Outcome::Placed(p)) => {
                    self.placements.insert((p.room.clone(), p.epoch), p.node.clone());
                    let kind = origins
                        .as_ref()
                        .and_then(|callers| caller_at(callers, position))
                        .and_then(|key| self.intents.remove(&key));
                    self.check_lineage(at, p.room.clone(), p.epoch, p.node.clone(), kind);
                }
                (Command::DeleteRoom { room, .. }, Outcome::Deleted(true)) => {
                    // A deleted room starts over at epoch 1 when it is placed again: its epoch
                    // history (and who hosted which epoch) ends here.
                    self.placements.retain(|(r, _), _| r != room);
                    self.hosts.retain(|(r, _), _| r != room);
                }
                (Command::UpsertViewers { viewers }, outcome @ Outcome::Upserted { .. }) => {
                    // A refused write (an older generation, a lost claim) leaves the stored
                    // state, written at an earlier index (recorded there already).
                    let stored = outcome.clone().stored_viewers(viewers.clone()).unwrap_or_default();
                    for s in stored.iter().filter(|s| s.revision == index) {
                        self.viewer_history
                            .entry(s.viewer.clone())
                            .or_default()
                            .insert(index, Some(s.clone()));
                    }
                    self.acks_dirty = true;
                }
                _ => {}
            }
        }
        let latest_clock_ms = CLOCK_BASE_MS + at.now_ms + CLOCK_SKEW_MAX_MS;
        for (viewer, state) in before {
            if self.reference.viewers().contains_key(&viewer) {
                continue;
            }
            let expired = payload.commands.iter().any(
                |c| matches!(c, Command::ExpireViewers { viewers } if viewers.iter().any(|(v, r)| *v == viewer && *r == state.revision)),
            );
            if expired {
                self.stats.expired += 1;
                if state.expires_at_ms > latest_clock_ms {
                    self.violations.push(Violation::ExpiredEarly {
                        at,
                        index,
                        viewer: viewer.clone(),
                        expires_at_ms: state.expires_at_ms,
                        latest_clock_ms,
                    });
                }
            }
            self.viewer_history.entry(viewer).or_default().insert(index, None);
            self.acks_dirty = true;
        }
        self.digests.insert(index, self.reference.digest());
    }

    fn check_lineage(&mut self, at: At, room: RoomId, epoch: u64, host: NodeId, kind: Option<PlaceKind>) {
        match kind {
            Some(PlaceKind::Migration { from, handoff_epoch }) => {
                self.stats.flips += 1;
                let previous = epoch.saturating_sub(1);
                if handoff_epoch != previous {
                    let previous_host = self.placements.get(&(room.clone(), previous)).cloned();
                    self.violations.push(Violation::EpochLineage {
                        at,
                        room,
                        epoch,
                        host,
                        from,
                        handoff_epoch,
                        previous,
                        previous_host,
                    });
                }
            }
            Some(PlaceKind::Failover) => self.stats.failovers += 1,
            Some(PlaceKind::Place) | None => {}
        }
    }

    fn host_acting(&mut self, at: At, node: NodeIndex, room: RoomId, epoch: u64) {
        let key = (room.clone(), epoch);
        if let Some(&first) = self.hosts.get(&key)
            && first != node
        {
            let (first, second) = (self.name(first), self.name(node));
            self.violations.push(Violation::TwoHosts {
                at,
                room: room.clone(),
                epoch,
                first,
                second,
            });
        }
        self.hosts.insert(key.clone(), node);
        let placed = self.placements.get(&key).cloned();
        let name = self.name(node);
        if placed.as_ref() != Some(&name) {
            self.violations.push(Violation::HostNotPlaced {
                at,
                room,
                epoch,
                node: name,
                placed,
            });
        }
    }

    fn acked(&mut self, at: At, state: ViewerState) {
        self.stats.acks += 1;
        let committed = self
            .viewer_history
            .get(&state.viewer)
            .and_then(|h| h.get(&state.revision));
        if committed != Some(&Some(state.clone())) {
            self.violations.push(Violation::AckedWriteLost {
                at,
                viewer: state.viewer.clone(),
                revision: state.revision,
                detail: format!("the committed log holds {committed:?} at that index"),
            });
            return;
        }
        let newer = self
            .acked
            .get(&state.viewer)
            .is_none_or(|a| a.revision < state.revision);
        if newer {
            self.acked.insert(state.viewer.clone(), state);
            self.acks_dirty = true;
        }
    }

    fn resume_judged(
        &mut self,
        at: At,
        viewer: ViewerId,
        acked: Option<ViewerState>,
        outcome: ResumeOutcome,
        read_clock_ms: u64,
    ) {
        match outcome {
            ResumeOutcome::Fresh => {}
            ResumeOutcome::Unreadable(_) => self.stats.resumes_unreadable += 1,
            ResumeOutcome::Resumed(state) => {
                self.stats.resumes_resumed += 1;
                let age_ms = read_clock_ms.saturating_sub(state.updated_at_ms);
                if age_ms > RESUME_WINDOW_MS {
                    self.violations
                        .push(Violation::ResumeOutsideWindow { at, viewer, age_ms });
                } else if let Some(a) = acked
                    && state.revision < a.revision
                {
                    self.violations.push(Violation::ResumeStale {
                        at,
                        viewer,
                        got: state.revision,
                        acked: a.revision,
                    });
                }
            }
            ResumeOutcome::Expired(found) => {
                self.stats.resumes_expired += 1;
                let Some(a) = acked else { return };
                let age_ms = read_clock_ms.saturating_sub(a.updated_at_ms);
                // Inside the window even if the writer's and the reader's clocks disagree.
                if age_ms + 2 * CLOCK_SKEW_MAX_MS <= RESUME_WINDOW_MS {
                    let detail = match found {
                        None => "no viewer state".to_string(),
                        Some(s) => format!("state at revision {} judged too old", s.revision),
                    };
                    self.violations.push(Violation::ResumeRefused {
                        at,
                        viewer,
                        revision: a.revision,
                        age_ms,
                        detail,
                    });
                }
            }
        }
    }

    /// The checks that look at the whole world, after step `step`. `watched` is, per room,
    /// the clients connected to an up node watching it.
    pub fn after_step(&mut self, at: At, nodes: &[Node], watched: &BTreeMap<RoomId, usize>) {
        self.check_leaders(at, nodes);
        self.check_digests(at, nodes);
        if self.acks_dirty {
            self.acks_dirty = false;
            self.check_acks(at);
        }
        if let Some(heal_ms) = self.heal_ms
            && at.now_ms >= heal_ms
        {
            self.check_hosts(at, nodes, watched, heal_ms);
            self.check_stale_hosts(at, nodes, heal_ms);
            self.check_migrations(at, nodes, heal_ms);
        }
    }

    fn check_leaders(&mut self, at: At, nodes: &[Node]) {
        for node in nodes {
            let Some(live) = &node.live else { continue };
            if !live.core.is_leader() {
                continue;
            }
            let term = live.core.status().term;
            match self.leaders.get(&term) {
                Some(&first) if first != node.index => {
                    let (first, second) = (self.name(first), self.name(node.index));
                    self.violations.push(Violation::TwoLeaders {
                        at,
                        term,
                        first,
                        second,
                    });
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, node.index);
                }
            }
        }
    }

    fn check_digests(&mut self, at: At, nodes: &[Node]) {
        for node in nodes {
            let Some(live) = &node.live else { continue };
            let sm = live.sm();
            let index = sm.applied().index;
            if index == self.digest_checked[node.index] {
                continue;
            }
            self.digest_checked[node.index] = index;
            self.stats.digests_compared += 1;
            // Same index as the reference: compare the states directly (cheaper than hashing).
            if index == self.reference.applied().index && *sm == self.reference {
                continue;
            }
            let expected = self.digests.get(&index).cloned();
            let found = sm.digest();
            if expected.as_ref() != Some(&found) {
                let node = self.name(node.index);
                self.violations.push(Violation::DigestMismatch {
                    at,
                    node,
                    index,
                    expected: expected.unwrap_or_else(|| "none (index not committed)".into()),
                    found,
                });
            }
        }
    }

    fn check_acks(&mut self, at: At) {
        let mut lost = Vec::new();
        let mut discharged = Vec::new();
        for (viewer, acked) in &self.acked {
            let removed = self
                .viewer_history
                .get(viewer)
                .is_some_and(|h| h.range(acked.revision + 1..).any(|(_, s)| s.is_none()));
            if removed {
                // A committed delete or expiry ended the acknowledged write's life. A state that
                // shows up again later (a late write of an earlier session recreating a deleted
                // viewer: nothing remembers a deleted viewer's generation) is not that write.
                discharged.push(viewer.clone());
                continue;
            }
            match self.reference.viewers().get(viewer) {
                // A later commit put an older playback position back: the acknowledged
                // progress is lost (a write issued before the acknowledged one landed after it).
                Some(current) if current.revision > acked.revision && current.position_ms < acked.position_ms => {
                    lost.push((
                        viewer.clone(),
                        acked.revision,
                        format!(
                            "superseded at revision {} by position {} ms < the acknowledged {} ms (session {} of generation {} stamped {} ms before the acknowledged write of session {} of generation {})",
                            current.revision,
                            current.position_ms,
                            acked.position_ms,
                            current.session,
                            current.generation,
                            acked.updated_at_ms.saturating_sub(current.updated_at_ms),
                            acked.session,
                            acked.generation
                        ),
                    ));
                }
                Some(current) if current.revision >= acked.revision => {}
                Some(current) => lost.push((
                    viewer.clone(),
                    acked.revision,
                    format!("the committed state went back to revision {}", current.revision),
                )),
                None => lost.push((
                    viewer.clone(),
                    acked.revision,
                    "gone without a committed delete or expiry".into(),
                )),
            }
        }
        for viewer in discharged {
            self.acked.remove(&viewer);
        }
        for (viewer, revision, detail) in lost {
            // Reported once per acknowledged write.
            self.acked.remove(&viewer);
            self.violations.push(Violation::AckedWriteLost {
                at,
                viewer,
                revision,
                detail,
            });
        }
    }

    fn check_hosts(&mut self, at: At, nodes: &[Node], watched: &BTreeMap<RoomId, usize>, heal_ms: u64) {
        self.host_gap_since.retain(|room, _| watched.contains_key(room));
        for (room, &viewers) in watched {
            let placement = self.reference.rooms().get(room);
            let problem = match placement {
                None => Some("not placed".to_string()),
                Some(p) => match self.roster.by_id(&p.node).and_then(|i| nodes[i].live.as_ref()) {
                    None => Some(format!("placed on {} at epoch {}, which is down", p.node, p.epoch)),
                    Some(live) => match live.control.rooms.get(room).map(|r| &r.mode) {
                        Some(RoomMode::Host { epoch }) if *epoch == p.epoch => None,
                        other => Some(format!(
                            "placed on {} at epoch {}, which holds it as {other:?}",
                            p.node, p.epoch
                        )),
                    },
                },
            };
            match problem {
                None => {
                    if let Some(since) = self.host_gap_since.remove(room) {
                        self.stats.host_gap_max_ms = self.stats.host_gap_max_ms.max(at.now_ms - since);
                    }
                }
                Some(detail) => {
                    let since = *self
                        .host_gap_since
                        .entry(room.clone())
                        .or_insert(at.now_ms.max(heal_ms));
                    let gap = at.now_ms - since;
                    self.stats.host_gap_max_ms = self.stats.host_gap_max_ms.max(gap);
                    if gap > LIVENESS_BOUND_MS {
                        self.violations.push(Violation::NoLiveHost {
                            at,
                            room: room.clone(),
                            viewers,
                            since_ms: since,
                            detail,
                        });
                        // Report it once; keep watching from now.
                        self.host_gap_since.insert(room.clone(), at.now_ms + STEP_MS);
                    }
                }
            }
        }
    }

    /// Hosts the directory no longer names stop within the bound after the heal.
    fn check_stale_hosts(&mut self, at: At, nodes: &[Node], heal_ms: u64) {
        let mut hosting = Vec::new();
        for node in nodes {
            let Some(live) = &node.live else { continue };
            for (room, local) in &live.control.rooms {
                if let RoomMode::Host { epoch } = local.mode {
                    hosting.push((node.index, room.clone(), epoch));
                }
            }
        }
        let current: Vec<(NodeIndex, RoomId)> = hosting.iter().map(|(n, r, _)| (*n, r.clone())).collect();
        self.stale_since.retain(|key, _| current.contains(key));
        for (node, room, epoch) in hosting {
            let placement = self.reference.rooms().get(&room);
            let name = self.name(node);
            let fresh = placement.is_some_and(|p| p.node == name && p.epoch == epoch);
            let key = (node, room.clone());
            if fresh {
                self.stale_since.remove(&key);
                continue;
            }
            let since = *self.stale_since.entry(key.clone()).or_insert(at.now_ms.max(heal_ms));
            if at.now_ms - since > LIVENESS_BOUND_MS {
                let placement = placement.map_or("no placement".to_string(), |p| {
                    format!("{} at epoch {}", p.node, p.epoch)
                });
                self.stale_since.insert(key, at.now_ms + STEP_MS);
                self.violations.push(Violation::StaleHost {
                    at,
                    node: name,
                    room,
                    epoch,
                    since_ms: since,
                    placement,
                });
            }
        }
    }

    fn check_migrations(&mut self, at: At, nodes: &[Node], heal_ms: u64) {
        let mut stuck = Vec::new();
        for ((node, migration), run) in &self.migrations {
            let from = run.started_ms.max(heal_ms);
            if at.now_ms.saturating_sub(from) > MIGRATION_BOUND_MS {
                let phase = nodes[*node]
                    .live
                    .as_ref()
                    .and_then(|l| l.control.migrations.get(migration))
                    .map_or("unknown".to_string(), |m| format!("{:?}", m.phase()));
                stuck.push((*node, *migration, run.room.clone(), run.started_ms, phase));
            }
        }
        for (node, migration, room, started_ms, phase) in stuck {
            self.migrations.remove(&(node, migration));
            let node = self.name(node);
            self.violations.push(Violation::MigrationStuck {
                at,
                node,
                migration,
                room,
                started_ms,
                phase,
            });
        }
    }
}

/// The `(origin, op)` of the caller whose commands cover `position` in the entry.
fn caller_at(callers: &[(NodeIndex, u64, usize)], position: usize) -> Option<(NodeIndex, u64)> {
    let mut start = 0;
    for &(origin, op, count) in callers {
        if position < start + count {
            return Some((origin, op));
        }
        start += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeSpec;

    const AT: At = At { step: 1, now_ms: 10 };

    fn checker() -> Checker {
        let nodes = ["a", "b"]
            .iter()
            .map(|id| NodeSpec {
                id: NodeId::from(*id),
                region: "seoul".into(),
                raft_id: mediamesh_cluster::raft_id_for(&NodeId::from(*id)),
                skew_ms: 0,
            })
            .collect();
        let mut initial = StateMachine::default();
        initial.apply_empty(1, 1);
        Checker::new(Rc::new(Roster { nodes }), initial, None)
    }

    /// Node 0 applies `commands` at `index` as batch `batch` of proposer 7.
    fn apply(c: &mut Checker, node: NodeIndex, index: u64, batch: u64, commands: Vec<Command>) {
        let data = codec::encode(&EntryPayload {
            proposer: 7,
            batch_id: batch,
            commands,
        });
        c.observe(
            AT,
            Observation::Applied {
                node,
                index,
                term: 1,
                entry_type: EntryType::EntryNormal,
                data,
            },
        );
    }

    fn place(room: &str, expected: Option<u64>, node: &str) -> Command {
        Command::PlaceRoom {
            room: RoomId::from(room),
            expected_epoch: expected,
            node: NodeId::from(node),
        }
    }

    fn kinds(c: &Checker) -> Vec<&'static str> {
        c.violations().iter().map(Violation::checker).collect()
    }

    #[test]
    fn callers_cover_positions_in_order() {
        let callers = [(0, 10, 2), (3, 7, 1)];
        assert_eq!(caller_at(&callers, 0), Some((0, 10)));
        assert_eq!(caller_at(&callers, 1), Some((0, 10)));
        assert_eq!(caller_at(&callers, 2), Some((3, 7)));
        assert_eq!(caller_at(&callers, 3), None);
    }

    #[test]
    fn hosts_must_be_the_placed_node_and_one_per_epoch() {
        let mut c = checker();
        apply(&mut c, 0, 2, 1, vec![place("r", None, "a")]);
        let host = |node, epoch| Observation::HostActing {
            node,
            room: RoomId::from("r"),
            epoch,
        };
        c.observe(AT, host(0, 1));
        assert!(c.violations().is_empty());
        c.observe(AT, host(1, 1));
        assert_eq!(kinds(&c), ["two-hosts", "host-not-placed"]);
        c.observe(AT, host(0, 2));
        assert_eq!(kinds(&c).last(), Some(&"host-not-placed"), "an epoch never placed");
    }

    #[test]
    fn replicas_must_apply_the_same_bytes() {
        let mut c = checker();
        apply(&mut c, 0, 2, 1, vec![place("r", None, "a")]);
        apply(&mut c, 1, 2, 1, vec![place("r", None, "a")]);
        assert!(c.violations().is_empty());
        apply(&mut c, 1, 2, 1, vec![place("r", None, "b")]);
        assert_eq!(kinds(&c), ["log-divergence"]);
    }

    #[test]
    fn a_flip_must_move_the_room_from_the_handoff_epoch() {
        let mut c = checker();
        apply(&mut c, 0, 2, 1, vec![place("r", None, "a")]);
        let migration = |op, handoff_epoch| Observation::PlaceIntent {
            origin: 0,
            op,
            kind: PlaceKind::Migration {
                from: NodeId::from("a"),
                handoff_epoch,
            },
        };
        let batch = |batch_id, origin, op| Observation::BatchProposed {
            proposer: 7,
            batch_id,
            callers: vec![(origin, op, 1)],
        };
        // Handoff at epoch 1, flip 1 -> 2: the lineage holds.
        c.observe(AT, migration(10, 1));
        c.observe(AT, batch(2, 0, 10));
        apply(&mut c, 0, 3, 2, vec![place("r", Some(1), "b")]);
        assert!(c.violations().is_empty());
        // A failover moves it on (epoch 3); a stale migration's handoff of epoch 1 flips 3 -> 4.
        c.observe(
            AT,
            Observation::PlaceIntent {
                origin: 1,
                op: 11,
                kind: PlaceKind::Failover,
            },
        );
        c.observe(AT, batch(3, 1, 11));
        apply(&mut c, 0, 4, 3, vec![place("r", Some(2), "a")]);
        c.observe(AT, migration(12, 1));
        c.observe(AT, batch(4, 0, 12));
        apply(&mut c, 0, 5, 4, vec![place("r", Some(3), "b")]);
        assert_eq!(kinds(&c), ["epoch-lineage"]);
        assert_eq!((c.stats.flips, c.stats.failovers), (2, 1));
    }

    fn viewer(position_ms: u64, updated_at_ms: u64, session: &str) -> ViewerState {
        ViewerState {
            viewer: ViewerId::from("v"),
            room: RoomId::from("r"),
            node: NodeId::from("a"),
            session: session.into(),
            display_name: String::new(),
            position_ms,
            subscriptions: Vec::new(),
            layers: Default::default(),
            updated_at_ms,
            expires_at_ms: 0,
            revision: 0,
            generation: 0,
        }
    }

    #[test]
    fn an_acknowledged_position_must_not_go_back() {
        let mut c = checker();
        apply(
            &mut c,
            0,
            2,
            1,
            vec![Command::UpsertViewers {
                viewers: vec![ViewerState {
                    generation: 1,
                    ..viewer(500, 1_000, "new")
                }],
            }],
        );
        let mut acked = c.reference().viewers()[&ViewerId::from("v")].clone();
        c.observe(
            AT,
            Observation::Acked {
                client: 0,
                state: acked.clone(),
            },
        );
        c.after_step(AT, &[], &BTreeMap::new());
        assert!(c.violations().is_empty());
        // A write of position 200 ms (before the acknowledged 500 ms) from `session` under
        // `generation`, committed at `index`.
        let write_back = |c: &mut Checker, index: u64, session: &str, generation: u64| {
            let stale = ViewerState {
                generation,
                ..viewer(200, 900, session)
            };
            apply(
                c,
                0,
                index,
                index - 1,
                vec![Command::UpsertViewers { viewers: vec![stale] }],
            );
            c.after_step(AT, &[], &BTreeMap::new());
        };
        // The session the viewer resumed from writes late: the state machine ignores a write
        // of an older generation.
        write_back(&mut c, 3, "old", 0);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        assert_eq!(c.reference().viewers()[&ViewerId::from("v")], acked);
        // Nor one of the same generation from another session (of two resumes from one state,
        // the first write to commit owns the viewer: seed 30).
        write_back(&mut c, 4, "other", 1);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        // A newer generation that goes back (a resume from a state older than the
        // acknowledged one) does put an older position back.
        write_back(&mut c, 5, "other", 2);
        assert_eq!(kinds(&c), ["acked-write-lost"]);
        // An acknowledgement of something never committed.
        acked.position_ms = 9;
        c.observe(
            AT,
            Observation::Acked {
                client: 0,
                state: acked,
            },
        );
        assert_eq!(kinds(&c).len(), 2);
    }

    #[test]
    fn resumes_inside_the_window_must_succeed_and_outside_must_not() {
        let mut c = checker();
        let acked = ViewerState {
            revision: 4,
            ..viewer(10, 10_000, "s")
        };
        let judged = |outcome, read_clock_ms| Observation::ResumeJudged {
            client: 0,
            viewer: ViewerId::from("v"),
            acked: Some(acked.clone()),
            outcome,
            read_clock_ms,
        };
        c.observe(AT, judged(ResumeOutcome::Resumed(acked.clone()), 11_000));
        c.observe(AT, judged(ResumeOutcome::Expired(None), 10_000 + RESUME_WINDOW_MS + 1));
        c.observe(AT, judged(ResumeOutcome::Unreadable("no quorum".into()), 11_000));
        assert!(c.violations().is_empty());
        c.observe(AT, judged(ResumeOutcome::Expired(None), 11_000));
        c.observe(
            AT,
            judged(ResumeOutcome::Resumed(acked.clone()), 10_000 + RESUME_WINDOW_MS + 1),
        );
        let older = ViewerState {
            revision: 3,
            ..acked.clone()
        };
        c.observe(AT, judged(ResumeOutcome::Resumed(older), 11_000));
        assert_eq!(kinds(&c), ["resume-refused", "resume-outside-window", "resume-stale"]);
    }
}
