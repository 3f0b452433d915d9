//! What one simulated run is (seed, length, cluster size, fault switches) and every timing,
//! limit and bound of the model, named in one place.
//!
//! Timings follow the node's defaults (`src/config.rs`, `cluster::store::StoreConfig::new`)
//! unless a comment says why the simulation shortens them (mostly so that expiry, drains and
//! migrations happen several times within one seed's minute of virtual time). The mesh's own
//! timings are not copies: they are `mediamesh_cluster::mesh::timing`'s, re-exported here.

use mediamesh_cluster::mesh::timing;

/// Virtual time advances in steps of this many milliseconds; the checkers run after each step.
pub const STEP_MS: u64 = 10;
/// Steps of one run unless `--steps` says otherwise: 60 s of virtual time.
pub const DEFAULT_STEPS: u64 = 6_000;
/// Nodes unless `--nodes` says otherwise (3 in Seoul, 2 in Busan).
pub const DEFAULT_NODES: usize = 5;
/// Most nodes a run may have (the roster and the network are dense matrices).
pub const NODES_MAX: usize = 9;
/// Fewest nodes a run may have.
pub const NODES_MIN: usize = 3;

// ----- raft and the store (cluster::store defaults) -----

/// Raft tick.
pub const RAFT_TICK_MS: u64 = 100;
/// Each tick lands up to this much before or after its nominal time (the seeded jitter that
/// breaks split votes, since the replicas' election timeout is fixed: see `Replica::new_with_election_ticks_max`).
pub const RAFT_TICK_JITTER_MS: u64 = 3;
/// Ticks before an election (fixed: the election range is `[10, 11)`).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between leader heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Deadline of a write or a linearizable read.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Snapshot and compact the log every this many applied entries. Production uses 10 000; the
/// simulation compacts often so that a node back from a long crash catches up by snapshot.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 200;
/// Most expiry batches the leader proposes per second.
pub const EXPIRY_BATCHES_PER_SECOND: u64 = 10;
/// Viewer-update proposals one node has in flight; viewer updates queued on one node: the
/// store's. (Operation limits and retry pauses live in the replica core the simulator runs.)
pub use mediamesh_cluster::store::{VIEWER_BATCHES_IN_FLIGHT_MAX, VIEWER_UPDATES_MAX};

// ----- the node's control plane (src/ defaults) -----

/// The node's own control loop (timers of the mesh tasks below) runs this often.
pub const CONTROL_TICK_MS: u64 = 25;
/// Node heartbeats (`--heartbeat-interval-ms`).
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Missed heartbeats before the leader declares a node dead (`--dead-after-missed`).
pub const DEAD_AFTER_MISSED: u32 = 3;
/// A node with no heartbeat for this long reads as dead (`node_dead_after_ms`).
pub const NODE_DEAD_AFTER_MS: u64 = HEARTBEAT_INTERVAL_MS * DEAD_AFTER_MISSED as u64;
/// The leader's failover task runs this often (heartbeat interval / 4).
pub const FAILOVER_TICK_MS: u64 = timing::failover_tick_ms(HEARTBEAT_INTERVAL_MS);
/// A hosted room checks the directory this often; migrations poll their room, the target must
/// hold the tracks, clients have this long to leave, a handoff's room stays open this long.
pub use mediamesh_cluster::mesh::timing::{
    CLIENTS_DEADLINE_MS, FENCE_INTERVAL_MS, HANDOFF_HOLD_MS, HANDOFF_TIMEOUT_MS, MIGRATION_POLL_MS,
};
/// A relayed room asks its host for the stream this often (the `PullTrack` stream, modelled as
/// a keepalive).
pub const RELAY_CHECK_MS: u64 = 1_000;
/// A relay whose host has not answered for this long re-locates the room (its stream ended).
pub const RELAY_SILENT_MS: u64 = 3_000;
/// The target answers a handoff at most this long after it arrives.
pub const HANDOFF_ANSWER_MAX_MS: u64 = HANDOFF_TIMEOUT_MS - timing::HANDOFF_ANSWER_MARGIN_MS;
/// A drain's deadline. Production uses 30 s; shortened so a drain ends within a run.
pub const DRAIN_DEADLINE_MS: u64 = 15_000;
/// The drain task looks at its rooms this often.
pub const DRAIN_TICK_MS: u64 = timing::DRAIN_POLL_MS;
/// The viewer batcher lingers this long while earlier batches are in flight.
pub const VIEWER_BATCH_MS: u64 = 5;
/// Capacity each node registers (sessions).
pub const NODE_CAPACITY: u32 = 100;

// ----- viewers -----

/// Viewer TTL the first leader writes into the cluster settings. Production: 300 s. The
/// simulation keeps the production ratio to the resume window roughly (TTL >> window) but
/// shortens both so that expiry happens inside a run.
pub const VIEWER_TTL_MS: u64 = 15_000;
/// A resume within this long of the viewer state's last update takes the state back
/// (`--resume-window-ms`, production 30 s).
pub const RESUME_WINDOW_MS: u64 = 5_000;
/// Rooms the viewers pick from.
pub const ROOMS: usize = 8;
/// Viewer clients.
pub const CLIENTS: usize = 24;
/// A client gives up on a request after this long (longer than the node's own deadlines).
pub const CLIENT_REQUEST_TIMEOUT_MS: u64 = 7_000;

// ----- clocks and network -----

/// Nodes' wall clocks start here (ms since the epoch) and never read the host's clock.
pub const CLOCK_BASE_MS: u64 = 1_750_000_000_000;
/// Each node's wall clock is off by a constant within ± this.
pub const CLOCK_SKEW_MAX_MS: u64 = 50;
/// One-way latency between Seoul and Busan (before jitter).
pub const CROSS_REGION_LATENCY_MS: u64 = 10;
/// Jitter added to a cross-region message, at most.
pub const CROSS_REGION_JITTER_MS: u64 = 3;
/// One-way latency inside a region (before jitter).
pub const IN_REGION_LATENCY_MS: u64 = 1;
/// Jitter added to an in-region message, at most.
pub const IN_REGION_JITTER_MS: u64 = 1;
/// One-way latency between a client and a node of its region (before jitter).
pub const CLIENT_IN_REGION_LATENCY_MS: u64 = 2;
/// Messages in flight on one directed link, at most (more are dropped and counted).
pub const LINK_IN_FLIGHT_MAX: usize = 10_000;
/// Messages held on one clogged link, at most (more are dropped and counted).
pub const LINK_HELD_MAX: usize = 2_048;
/// Events waiting in the world's queue, at most (more is a simulator bug, reported).
pub const QUEUE_EVENTS_MAX: usize = 1_000_000;

// ----- the fault schedule and the bounds the checkers hold the cluster to -----

/// No fault before this time (the cluster forms).
pub const CHAOS_START_MS: u64 = 3_000;
/// Faults stop (everything heals) this long before the end of the run.
pub const HEAL_TAIL_MS: u64 = 25_000;
/// Runs shorter than this have no faults (there is no room for the heal tail).
pub const CHAOS_RUN_MIN_MS: u64 = CHAOS_START_MS + HEAL_TAIL_MS + 5_000;
/// At most this many nodes are crashed at once.
pub const CRASHED_AT_ONCE_MAX: usize = 2;
/// After the heal, every room with connected viewers has a live host (a node that is up and
/// serves the room as host under the directory's epoch) within this bound, and never goes
/// without one for longer. Budget: an election (≤ 2 election timeouts, 2 s), heartbeats
/// bringing nodes back to alive (≤ 1.5 s), the relay's silence before it re-locates (3 s),
/// the relay check period (1 s), a read and a compare-and-set (< 0.2 s), the fence (0.5 s),
/// with slack.
pub const LIVENESS_BOUND_MS: u64 = 10_000;
/// A migration started before the heal finishes within this long after it (handoff timeout,
/// a request deadline for the flip, the clients deadline, polls).
pub const MIGRATION_BOUND_MS: u64 = HANDOFF_TIMEOUT_MS + REQUEST_TIMEOUT_MS + CLIENTS_DEADLINE_MS / 2;

// ----- diagnostics -----

/// Trace lines kept for a violation report.
pub const TRACE_TAIL_MAX: usize = 400;

/// Test-only faults in the real code, switched on from the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// `Migration::with_faults(Faults { skip_epoch_check: true })`: the flip is proposed without
    /// the epoch compare, carried out as a blind read-modify-write of the proposer's view.
    pub skip_epoch_check: bool,
    /// `CoreFaults { ack_upserts_on_propose: true }` in the store's replica core: a viewer
    /// upsert is acknowledged when the leader proposes it, before it commits.
    pub ack_before_commit: bool,
}

/// One run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed of the run's one RNG.
    pub seed: u64,
    /// Steps of [`STEP_MS`] to run.
    pub steps: u64,
    /// Nodes (regions alternate: the first 3/5 in Seoul, the rest in Busan).
    pub nodes: usize,
    /// Faults switched on in the real code.
    pub faults: Faults,
    /// Print every trace line to stderr as it happens.
    pub print_trace: bool,
}

impl SimConfig {
    /// The default run of `seed`.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            steps: DEFAULT_STEPS,
            nodes: DEFAULT_NODES,
            faults: Faults::default(),
            print_trace: false,
        }
    }

    /// Virtual time the run lasts.
    pub fn duration_ms(&self) -> u64 {
        self.steps.saturating_mul(STEP_MS)
    }

    /// When the faults stop: the heal. `None` for runs too short to have faults.
    pub fn heal_ms(&self) -> Option<u64> {
        let duration = self.duration_ms();
        (duration >= CHAOS_RUN_MIN_MS).then(|| duration - HEAL_TAIL_MS)
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), String> {
        if !(NODES_MIN..=NODES_MAX).contains(&self.nodes) {
            return Err(format!("--nodes must be {NODES_MIN}..={NODES_MAX}"));
        }
        if self.steps == 0 {
            return Err("--steps must be positive".into());
        }
        Ok(())
    }
}
