//! Capacity model of the control plane: what 1,000,000 viewers on 100 nodes ask of one Raft
//! group when every viewer's state is written through it, and where one group stops being
//! enough. The model's inputs are measured here, on this machine, on the real code:
//!
//! - **Sizes** (`codec::encode`, bincode 2): a typical `ViewerState` (built as
//!   `src/signal/session.rs` builds it), the `EntryPayload` one node proposes for N viewer
//!   updates (one `UpsertViewers` per `VIEWERS_PER_UPSERT_MAX`, packed into entries as
//!   `issue_proposals` packs them), the forwarded proposal (`ForwardedCommands` in a prost
//!   `ProposeRequest`) and the leader's answer (`ForwardedOutcome`, which carries every stored
//!   state back). The raft framing of an entry (`eraftpb::Entry` inside a `MsgAppend`, inside a
//!   `RaftBatch`) is written with the protobuf wire format and checked by decoding it with the
//!   real transport's `decode_raft_batch` (raft-rs 0.7 uses rust-protobuf, which this package
//!   cannot name, so its `compute_size` is not callable from here).
//! - **Apply** (one thread): decode + `StateMachine::apply` of `UpsertViewers` entries of 1,024
//!   for 1,000,000 distinct viewers — as two state machines of 500,000, since one refuses more
//!   than `VIEWERS_MAX` (checked) — then three update passes in random order (best kept), and
//!   the cost per entry at 1, 16, 128, 512 and 1,024 viewers per entry.
//! - **sled**: `LogStore::append` (the log write the replica makes per entry since format 2; no
//!   flush) for 65,536 viewers in entries of 1,024, and for entries of one viewer.
//! - **Whole state at 500,000 viewers**: `encode_snapshot` (size, time), `decode_snapshot`,
//!   `digest` (computed by every `Store::status`) and `due_viewers` (the leader's expiry scan).
//!
//! Read, not re-run: `benches/results/store-latest.json` (the replicated store's commit latency
//! and throughput, and the fdatasync rate of this machine).
//!
//! ```text
//! cargo bench --bench capacity -- [--results DIR] [--store-results FILE]
//! ```
//!
//! Results: `benches/results/capacity-<UTC>.{md,json}` and `capacity-latest.{md,json}`.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mediamesh_cluster::codec::{self, ENTRY_BYTES_MAX, SNAPSHOT_BYTES_MAX};
use mediamesh_cluster::command::{
    COMMANDS_PER_ENTRY_MAX, Command, EntryPayload, ForwardedCommands, ForwardedOutcome, Outcome,
    VIEWERS_PER_UPSERT_MAX, pack_proposals,
};
use mediamesh_cluster::state_machine::{DEFAULT_VIEWER_TTL_MS, StateMachine, VIEWERS_MAX};
use mediamesh_cluster::storage::{Disk, LogStore as _};
use mediamesh_cluster::{NodeId, NodeLoad, RoomId, StoreConfig, ViewerId, ViewerState, raft_id_for};
use mediamesh_proto::cluster::v1 as pb;
use prost::Message as _;
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use serde_json::json;

// ----- the scenario -----

/// Nodes in the cluster.
const NODES: usize = 100;
/// Viewers, spread evenly over the nodes.
const VIEWERS: usize = 1_000_000;
/// Seconds between two state writes of one viewer that the model shows besides the real one.
const REPORT_INTERVALS_S: [f64; 4] = [1.0, 5.0, 10.0, 30.0];
/// How long each node gathers its viewers' updates into one proposal, in the model.
const BATCH_INTERVALS_MS: [u64; 7] = [10, 50, 100, 250, 500, 1000, 5000];
/// Followers of the leader in a 3- and a 5-voter group.
const FOLLOWERS: [usize; 2] = [2, 4];
/// Today every node that joins is promoted to voter (`Replica::maybe_promote_learners`), so
/// with 100 nodes the leader has 99 followers.
const FOLLOWERS_ALL_NODES: usize = NODES - 1;
/// Link speeds the leader's egress is compared with, bits per second.
const LINK_BITS_PER_S: [f64; 2] = [1e9, 1e10];
/// Batch intervals the limits section shows (ms).
const LIMIT_BATCH_INTERVALS_MS: [u64; 3] = [10, 100, 1000];
/// The sharding estimate: report interval (s), batch interval (ms), followers, link.
const SHARDING_REPORT_INTERVAL_S: f64 = 1.0;
const SHARDING_BATCH_INTERVAL_MS: u64 = 100;
const SHARDING_LINK_BITS_PER_S: f64 = 1e10;
/// Share of a resource a group may use in the sharding estimate (the rest is for catch-up,
/// elections, snapshots sent to a lagging follower and bursts).
const TARGET_UTILISATION: f64 = 0.5;
/// Node heartbeat period of `mediamesh node` (`--heartbeat-interval-ms`'s default); each is
/// one `Command::Heartbeat` proposal.
const NODE_HEARTBEAT_INTERVAL_MS: u64 = mediamesh::config::DEFAULT_HEARTBEAT_INTERVAL_MS;

// ----- wire constants (estimates, not measured) -----

/// HTTP/2 + gRPC bytes of one unary call besides the protobuf message: request HEADERS with
/// HPACK-indexed fields (≈ 9 + 20 B) and the answer's HEADERS and trailers (≈ 2 × (9 + 10) B);
/// DATA frame headers (9 B per 16 KiB) and the gRPC length prefix (5 B) are counted exactly.
const GRPC_CALL_HEADERS_BYTES: usize = 70;
/// A forwarded proposal carries W3C trace context (`traceparent`: a 55-byte value that changes
/// with every call, so HPACK sends it literally).
const TRACE_CONTEXT_BYTES: usize = 60;
/// HTTP/2 frame size limit (default), for DATA frame headers.
const HTTP2_FRAME_BYTES: usize = 16_384;
/// Wire bytes per payload byte on a 1500-byte MTU Ethernet link: TCP/IPv4 with timestamps
/// (52 B) and Ethernet framing, preamble and gap (38 B) per 1448-byte segment.
const WIRE_BYTES_PER_PAYLOAD_BYTE: f64 = 1538.0 / 1448.0;

// ----- the measurements -----

/// Update passes over the 1M viewers; the best is kept (the machine is shared).
const APPLY_REPEATS: usize = 3;
/// Viewers per entry in the per-entry cost sweep, and viewers it covers.
const SWEEP_ENTRY_SIZES: [usize; 5] = [1, 16, 128, 512, 1024];
const SWEEP_VIEWERS: usize = 32_768;
const SWEEP_ROUNDS: usize = 4;
/// Viewers written through the sled log (`LogStore::append`), and one-viewer entries for its
/// per-entry cost.
const SLED_VIEWERS: usize = 65_536;
const SLED_SINGLE_ENTRIES: usize = 2_048;
/// Entry sizes whose encoded payload the report lists.
const SIZE_TABLE_N: [usize; 8] = [1, 10, 50, 100, 500, 1024, 5_000, 10_000];
/// Raft term and a realistic index for framing (an index after a day at ~1,000 entries/s).
const TERM: u64 = 7;
const TYPICAL_INDEX: u64 = 90_000_000;
/// Rooms the viewers are spread over (names `room-00042`).
const ROOMS: usize = 10_000;
/// Display names the edge masks (`pii::shown_name` with masking on).
const NAMES: [&str; 8] = [
    "김민수",
    "이서연",
    "박지훈",
    "최유진",
    "정하늘",
    "강도윤",
    "조수아",
    "윤지호",
];

#[derive(Debug, Clone)]
struct Args {
    results_dir: PathBuf,
    store_results: PathBuf,
}

fn usage() -> &'static str {
    "cargo bench --bench capacity -- [--results benches/results] [--store-results benches/results/store-latest.json]"
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        results_dir: root.join("benches").join("results"),
        store_results: root.join("benches").join("results").join("store-latest.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{}", usage()));
        match flag.as_str() {
            "--bench" => {} // cargo bench passes it to harness = false targets
            "--results" => args.results_dir = PathBuf::from(value()?),
            "--store-results" => args.store_results = PathBuf::from(value()?),
            "--help" | "-h" => return Err(usage().to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(args)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CPU seconds this thread has used (`CLOCK_THREAD_CPUTIME_ID`): what the work costs a core,
/// without the time other processes on this shared machine held it.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec owned here.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        f64::NAN
    }
}

fn node_name(n: usize) -> String {
    if n < NODES / 2 {
        format!("seoul-{n:03}")
    } else {
        format!("busan-{n:03}")
    }
}

/// A viewer's state as `Joined::viewer_state` (src/signal/session.rs) writes it for a viewer
/// that kept the room's default tracks and layer (what the SDKs do unless told otherwise):
/// the viewer id and the signal session's own id are `SessionId`s (UUIDv7, 32 hex digits), the
/// display name is masked, no subscriptions, no layer. `updated_at_ms` as `Store::upsert_viewer`
/// sets it; `expires_at_ms` and `revision` are set by the state machine.
fn typical_viewer(i: usize, now: u64) -> ViewerState {
    let session = mediamesh_actors::ids::SessionId::generate().to_string();
    ViewerState {
        viewer: ViewerId::new(mediamesh_actors::ids::SessionId::generate().to_string()),
        room: RoomId::new(format!("room-{:05}", i % ROOMS)),
        node: NodeId::new(node_name(i % NODES)),
        session,
        display_name: mediamesh_actors::pii::shown_name(NAMES[i % NAMES.len()], true),
        // 10 to 60 minutes into the stream.
        position_ms: 600_000 + (i as u64 * 7_919) % 3_000_000,
        subscriptions: Vec::new(),
        layers: BTreeMap::new(),
        updated_at_ms: now,
        expires_at_ms: 0,
        revision: 0,
        generation: 0,
    }
}

/// The same viewer after choosing two tracks and a layer (`subscribe`, `set_layer`).
fn viewer_with_choices(base: &ViewerState) -> ViewerState {
    let publisher = mediamesh_actors::ids::SessionId::generate().to_string();
    let mut v = base.clone();
    v.subscriptions = vec![format!("{publisher}/video"), format!("{publisher}/audio")];
    v.layers.insert(
        "video".to_string(),
        mediamesh_actors::media::layer::LAYER_NAMES[2].to_string(),
    );
    v
}

/// The state as the state machine stores it (and answers it, and snapshots it).
fn stored(v: &ViewerState, index: u64) -> ViewerState {
    let mut v = v.clone();
    v.expires_at_ms = v.updated_at_ms + DEFAULT_VIEWER_TTL_MS;
    v.revision = index;
    v
}

// ----- protobuf framing of raft messages -----

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A proto3 scalar field (omitted when zero, as rust-protobuf writes it).
fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    if v != 0 {
        put_varint(out, field << 3);
        put_varint(out, v);
    }
}

/// A length-delimited field.
fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The ids and indexes of one `MsgAppend` from the leader to a follower.
#[derive(Debug, Clone, Copy)]
struct AppendFraming {
    to: u64,
    from: u64,
    term: u64,
    index: u64,
}

impl AppendFraming {
    /// `eraftpb::Entry { term, index, data }` (entry type Normal = 0, omitted).
    fn entry(&self, index: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 24);
        put_uint(&mut out, 2, self.term);
        put_uint(&mut out, 3, index);
        if !data.is_empty() {
            put_bytes(&mut out, 4, data);
        }
        out
    }

    /// `eraftpb::Message` of type `MsgAppend` (3) carrying `entries` after `self.index`, as
    /// raft-rs's `prepare_send_entries` fills it.
    fn message(&self, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        put_uint(&mut out, 1, 3);
        put_uint(&mut out, 2, self.to);
        put_uint(&mut out, 3, self.from);
        put_uint(&mut out, 4, self.term);
        put_uint(&mut out, 5, self.term);
        put_uint(&mut out, 6, self.index);
        for e in entries {
            put_bytes(&mut out, 7, e);
        }
        put_uint(&mut out, 8, self.index);
        out
    }

    /// Length of `message` with one entry of `data_len` bytes, without building it.
    fn message_len_one_entry(&self, data_len: usize) -> usize {
        let field = |v: u64| if v == 0 { 0 } else { 1 + varint_len(v) };
        let entry = field(self.term) + field(self.index + 1) + 1 + varint_len(data_len as u64) + data_len;
        field(3)
            + field(self.to)
            + field(self.from)
            + 2 * field(self.term)
            + 2 * field(self.index)
            + 1
            + varint_len(entry as u64)
            + entry
    }
}

/// Bytes of one unary gRPC call carrying a protobuf message of `message_len` bytes, headers
/// of both directions included (see the constants).
fn grpc_call_bytes(message_len: usize) -> usize {
    let framed = message_len + 5;
    framed + 9 * framed.div_ceil(HTTP2_FRAME_BYTES) + GRPC_CALL_HEADERS_BYTES
}

/// `RaftBatch` around one raft message of `message_len` bytes (prost), as a gRPC call.
fn raft_batch_call_bytes(from_raft_id: u64, from_addr: &str, message_len: usize) -> usize {
    let empty = pb::RaftBatch {
        from_raft_id,
        from_addr: from_addr.to_string(),
        messages: Vec::new(),
    }
    .encoded_len();
    grpc_call_bytes(empty + 1 + varint_len(message_len as u64) + message_len)
}

// ----- one node's batch -----

/// What one node's batch of N viewer updates becomes, from real encodings.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct BatchShape {
    viewers: usize,
    /// `UpsertViewers` proposals (one per `VIEWERS_PER_UPSERT_MAX`), each forwarded on its own.
    proposals: usize,
    /// Raft entries after packing as `issue_proposals` packs (≤ `ENTRY_BYTES_MAX / 2` and
    /// ≤ `COMMANDS_PER_ENTRY_MAX` commands per entry).
    entries: usize,
    /// Sum of the encoded `EntryPayload`s (the raft entries' data).
    entry_data_bytes: usize,
    /// The same entries as `MsgAppend` messages in `RaftBatch` gRPC calls, one entry per call.
    entry_call_bytes: usize,
    /// The forwarded proposals as gRPC calls (`ProposeRequest`, trace context included).
    forward_call_bytes: usize,
    /// The leader's answers (`ProposeResponse` with `ForwardedOutcome`, every stored state).
    answer_bytes: usize,
}

struct Shaper<'a> {
    states: &'a [ViewerState],
    framing: AppendFraming,
    proposer: u64,
    from_addr: String,
    cache: HashMap<usize, BatchShape>,
    /// Viewers in each entry of a batch of N.
    entry_viewers: HashMap<usize, Vec<usize>>,
}

impl Shaper<'_> {
    fn shape(&mut self, n: usize) -> BatchShape {
        if let Some(s) = self.cache.get(&n) {
            return *s;
        }
        assert!(
            n <= self.states.len(),
            "the population holds {} viewers",
            self.states.len()
        );
        let mut shape = BatchShape {
            viewers: n,
            ..BatchShape::default()
        };
        let mut proposals: Vec<(Command, usize)> = Vec::new();
        let mut entry_viewers = Vec::new();
        for chunk in self.states[..n].chunks(VIEWERS_PER_UPSERT_MAX) {
            let command = Command::UpsertViewers {
                viewers: chunk.to_vec(),
            };
            let forwarded = codec::encode(&ForwardedCommands {
                commands: vec![command.clone()],
            });
            shape.forward_call_bytes +=
                grpc_call_bytes(pb::ProposeRequest { commands: forwarded }.encoded_len()) + TRACE_CONTEXT_BYTES;
            // Version 2: the leader names only the refused viewers (none here).
            let answer = codec::encode_versioned(
                mediamesh_cluster::command::FORWARD_VERSION,
                &ForwardedOutcome::Applied(vec![Outcome::Upserted {
                    index: TYPICAL_INDEX,
                    ttl_ms: DEFAULT_VIEWER_TTL_MS,
                    kept: Vec::new(),
                }]),
            );
            shape.answer_bytes += pb::ProposeResponse { results: answer }.encoded_len() + 5 + 9;
            // `Store::propose` sizes a proposal as the encoding of its commands.
            let size = codec::encode(&vec![command.clone()]).len();
            proposals.push((command, size));
        }
        shape.proposals = proposals.len();
        // Packed as `issue_proposals` packs them.
        let entries = pack_proposals(proposals.iter().map(|(_, size)| (1, *size)));
        let mut queue = proposals.into_iter();
        for taken in entries {
            let mut commands = Vec::new();
            let mut viewers = 0;
            for (command, _) in queue.by_ref().take(taken) {
                if let Command::UpsertViewers { viewers: v } = &command {
                    viewers += v.len();
                }
                commands.push(command);
            }
            entry_viewers.push(viewers);
            let data = codec::encode(&EntryPayload {
                proposer: self.proposer,
                batch_id: u64::MAX / 3,
                commands,
            });
            assert!(data.len() <= ENTRY_BYTES_MAX, "an entry of {} bytes", data.len());
            shape.entries += 1;
            shape.entry_data_bytes += data.len();
            shape.entry_call_bytes += raft_batch_call_bytes(
                self.proposer,
                &self.from_addr,
                self.framing.message_len_one_entry(data.len()),
            );
        }
        self.cache.insert(n, shape);
        self.entry_viewers.insert(n, entry_viewers);
        shape
    }

    /// CPU seconds applying one batch of N costs, entry by entry.
    fn batch_cost(&mut self, n: usize, curve: &CostCurve) -> f64 {
        self.shape(n);
        self.entry_viewers
            .get(&n)
            .map_or(0.0, |e| e.iter().map(|&v| curve.at(v)).sum())
    }
}

// ----- apply measurements -----

/// Timing of applying a list of entries.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct ApplyTiming {
    entries: usize,
    viewers: usize,
    wall_s: f64,
    cpu_s: f64,
    decode_s: f64,
    apply_s: f64,
}

impl ApplyTiming {
    /// Viewers per CPU second of the applying thread: one dedicated core's throughput.
    fn viewers_per_s(&self) -> f64 {
        self.viewers as f64 / self.cpu_s.max(1e-9)
    }
    fn entries_per_s(&self) -> f64 {
        self.entries as f64 / self.cpu_s.max(1e-9)
    }
    /// CPU µs per entry.
    fn us_per_entry(&self) -> f64 {
        self.cpu_s * 1e6 / self.entries.max(1) as f64
    }
    fn add(&mut self, other: &ApplyTiming) {
        self.entries += other.entries;
        self.viewers += other.viewers;
        self.wall_s += other.wall_s;
        self.cpu_s += other.cpu_s;
        self.decode_s += other.decode_s;
        self.apply_s += other.apply_s;
    }
}

/// Encodes entries of up to `per_entry` viewers (one `UpsertViewers` each) from `states` in
/// the order `order`.
fn encode_entries(states: &[ViewerState], order: &[usize], per_entry: usize, proposer: u64) -> Vec<Vec<u8>> {
    assert!(per_entry <= VIEWERS_PER_UPSERT_MAX);
    order
        .chunks(per_entry)
        .enumerate()
        .map(|(i, chunk)| {
            codec::encode(&EntryPayload {
                proposer,
                batch_id: i as u64,
                commands: vec![Command::UpsertViewers {
                    viewers: chunk.iter().map(|&j| states[j].clone()).collect(),
                }],
            })
        })
        .collect()
}

/// Decodes and applies `entries` as the replica does (`ReplicaTask::apply`), each with its
/// own write list, and checks that every upsert was stored.
fn apply_entries(sm: &mut StateMachine, entries: &[Vec<u8>]) -> ApplyTiming {
    let mut timing = ApplyTiming {
        entries: entries.len(),
        ..ApplyTiming::default()
    };
    let cpu0 = thread_cpu_s();
    let start = Instant::now();
    let (mut decode, mut apply) = (Duration::ZERO, Duration::ZERO);
    for bytes in entries {
        let t0 = Instant::now();
        let payload = codec::decode::<EntryPayload, ENTRY_BYTES_MAX>(bytes).expect("the bench encoded this entry");
        let t1 = Instant::now();
        let index = sm.applied().index + 1;
        let sent: usize = payload
            .commands
            .iter()
            .map(|c| match c {
                Command::UpsertViewers { viewers } => viewers.len(),
                _ => 0,
            })
            .sum();
        let outcomes = sm.apply(index, TERM, payload.commands);
        for outcome in &outcomes {
            match outcome {
                Outcome::Upserted { kept, .. } if kept.is_empty() => {}
                other => panic!("an upsert was not stored: {other:?}"),
            }
        }
        timing.viewers += sent;
        drop(outcomes);
        decode += t1 - t0;
        apply += t1.elapsed();
    }
    timing.wall_s = start.elapsed().as_secs_f64();
    timing.cpu_s = thread_cpu_s() - cpu0;
    timing.decode_s = decode.as_secs_f64();
    timing.apply_s = apply.as_secs_f64();
    timing
}

/// CPU seconds one entry costs by the viewers it holds: measured points, linear between them,
/// and per viewer at the largest point beyond it (entries of several 1,024-viewer commands).
/// The cost per viewer is not constant (it grows with the entry: see the report), so no
/// straight line through all points.
#[derive(Debug, Clone, serde::Serialize)]
struct CostCurve {
    /// (viewers per entry, CPU seconds per entry), ascending.
    points: Vec<(usize, f64)>,
}

impl CostCurve {
    fn at(&self, viewers: usize) -> f64 {
        let (Some(&(n0, c0)), Some(&(n_last, c_last))) = (self.points.first(), self.points.last()) else {
            return 0.0;
        };
        if viewers <= n0 {
            return c0;
        }
        if viewers >= n_last {
            return c_last * viewers as f64 / n_last as f64;
        }
        for pair in self.points.windows(2) {
            let ((na, ca), (nb, cb)) = (pair[0], pair[1]);
            if viewers <= nb {
                return ca + (cb - ca) * (viewers - na) as f64 / (nb - na) as f64;
            }
        }
        c_last
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct SledTiming {
    insert_viewers_per_s: f64,
    update_viewers_per_s: f64,
    single_entries_per_s: f64,
}

/// Applies into a fresh replica state and times the sled log append of each entry alone
/// (`LogStore::append`: since data directory format 2 the replica writes nothing else per entry;
/// the state machine stays in memory).
fn measure_sled(states: &[ViewerState], proposer: u64) -> Result<(SledTiming, CostCurve), String> {
    // Removed when dropped (also on panic).
    let dir = tempfile::Builder::new()
        .prefix("mediamesh-capacity-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let (disk, storage, mut sm) = Disk::open(dir.path()).map_err(|e| e.to_string())?;
    let commit = |sm: &mut StateMachine, entries: &[Vec<u8>]| -> Result<(f64, usize), String> {
        let mut seconds = 0.0;
        let mut viewers = 0;
        for bytes in entries {
            let payload = codec::decode::<EntryPayload, ENTRY_BYTES_MAX>(bytes).map_err(|e| e.to_string())?;
            let index = sm.applied().index + 1;
            for command in &payload.commands {
                if let Command::UpsertViewers { viewers: v } = command {
                    viewers += v.len();
                }
            }
            sm.apply(index, TERM, payload.commands);
            let entry = raft::eraftpb::Entry {
                index,
                term: TERM,
                data: bytes.clone().into(),
                ..Default::default()
            };
            let t0 = thread_cpu_s();
            storage.append(&[entry]).map_err(|e| e.to_string())?;
            seconds += thread_cpu_s() - t0;
        }
        Ok((seconds, viewers))
    };
    let order: Vec<usize> = (0..SLED_VIEWERS.min(states.len())).collect();
    let inserts = encode_entries(states, &order, VIEWERS_PER_UPSERT_MAX, proposer);
    let (s, n) = commit(&mut sm, &inserts)?;
    let mut timing = SledTiming {
        insert_viewers_per_s: n as f64 / s,
        ..SledTiming::default()
    };
    let mut shuffled = order.clone();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
    let updates = encode_entries(states, &shuffled, VIEWERS_PER_UPSERT_MAX, proposer);
    let mut best_update = f64::MAX;
    for _ in 0..APPLY_REPEATS {
        let (s, n) = commit(&mut sm, &updates)?;
        best_update = best_update.min(s / n as f64);
    }
    timing.update_viewers_per_s = 1.0 / best_update;
    let singles = encode_entries(
        states,
        &shuffled[..SLED_SINGLE_ENTRIES.min(shuffled.len())],
        1,
        proposer,
    );
    let mut best_single = f64::MAX;
    for _ in 0..APPLY_REPEATS {
        let (s, n) = commit(&mut sm, &singles)?;
        best_single = best_single.min(s / n as f64);
    }
    timing.single_entries_per_s = 1.0 / best_single;
    let curve = CostCurve {
        points: vec![
            (1, best_single),
            (VIEWERS_PER_UPSERT_MAX, best_update * VIEWERS_PER_UPSERT_MAX as f64),
        ],
    };
    drop(storage);
    drop(disk);
    Ok((timing, curve))
}

/// Whole-state operations on one state machine.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct WholeState {
    viewers: usize,
    snapshot_bytes: usize,
    /// CPU seconds of this thread (the wall time is in `*_wall_s`).
    encode_snapshot_s: f64,
    decode_snapshot_s: f64,
    digest_s: f64,
    expiry_scan_s: f64,
    encode_snapshot_wall_s: f64,
    decode_snapshot_wall_s: f64,
    digest_wall_s: f64,
    expiry_scan_wall_s: f64,
}

/// Best CPU time and best wall time of `repeats` runs, and the last value.
fn best_of<T>(repeats: usize, mut f: impl FnMut() -> T) -> ((f64, f64), T) {
    let (mut cpu, mut wall) = (f64::MAX, f64::MAX);
    let mut last = None;
    for _ in 0..repeats {
        let (t0, c0) = (Instant::now(), thread_cpu_s());
        let value = f();
        cpu = cpu.min(thread_cpu_s() - c0);
        wall = wall.min(t0.elapsed().as_secs_f64());
        last = Some(value);
    }
    // repeats ≥ 1 at every call site.
    ((cpu, wall), last.expect("at least one repeat"))
}

fn measure_whole_state(sm: &StateMachine, now: u64) -> WholeState {
    let (encode_s, snapshot) = best_of(2, || sm.encode_snapshot());
    let (decode_s, decoded) = best_of(1, || StateMachine::decode_snapshot(&snapshot));
    assert!(decoded.is_ok_and(|d| d.viewers().len() == sm.viewers().len()));
    let (digest_s, digest) = best_of(1, || sm.digest());
    assert_eq!(digest.len(), 64);
    // Nothing is due yet (TTL 300 s): the scan the leader runs on every tick.
    let (scan_s, due) = best_of(APPLY_REPEATS, || sm.due_viewers(now, 0, 512));
    assert!(due.is_empty());
    WholeState {
        viewers: sm.viewers().len(),
        snapshot_bytes: snapshot.len(),
        encode_snapshot_s: encode_s.0,
        decode_snapshot_s: decode_s.0,
        digest_s: digest_s.0,
        expiry_scan_s: scan_s.0,
        encode_snapshot_wall_s: encode_s.1,
        decode_snapshot_wall_s: decode_s.1,
        digest_wall_s: digest_s.1,
        expiry_scan_wall_s: scan_s.1,
    }
}

// ----- the replicated store (from store-latest.json) -----

#[derive(Debug, Clone, Default, serde::Serialize)]
struct StoreFacts {
    source: String,
    date: String,
    git_commit: String,
    /// `store in-process`, 3 replicas, the fewest writers measured: commit latency at light load.
    light_writers: u64,
    light_p50_ms: f64,
    light_p99_ms: f64,
    light_ops_per_s: f64,
    /// `store in-process`, 256 writers: throughput and latency under load.
    loaded_ops_per_s: f64,
    loaded_p50_ms: f64,
    loaded_p99_ms: f64,
    /// `mediamesh http`, 256 writers (three node processes).
    http_ops_per_s: f64,
    http_p50_ms: f64,
    http_p99_ms: f64,
    /// `store 1 replica, window 0`, 256 writers.
    single_replica_ops_per_s: f64,
    /// `fdatasync 4 KiB`, one writer.
    fdatasync_per_s: f64,
    fdatasync_p50_ms: f64,
}

fn read_store_facts(path: &std::path::Path) -> Result<StoreFacts, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let points = v["points"].as_array().ok_or("no points")?;
    let find = |system: &str, writers: u64| {
        points
            .iter()
            .find(|p| p["system"] == system && p["writers"] == writers)
            .ok_or_else(|| format!("no {system:?} point at {writers} writers in {}", path.display()))
    };
    let num = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    // The lightest load the store bench measured (16 writers by default).
    let light = points
        .iter()
        .filter(|p| p["system"] == "store in-process")
        .min_by_key(|p| p["writers"].as_u64().unwrap_or(u64::MAX))
        .ok_or_else(|| format!("no \"store in-process\" point in {}", path.display()))?;
    let loaded = find("store in-process", 256)?;
    let http = find("mediamesh http", 256)?;
    let single = find("store 1 replica, window 0", 256)?;
    let sync = find("fdatasync 4 KiB", 1)?;
    Ok(StoreFacts {
        source: path
            .file_name()
            .map(|f| f.to_string_lossy().replace(".json", ".md"))
            .unwrap_or_default(),
        date: v["date"].as_str().unwrap_or("?").to_string(),
        git_commit: v["git_commit"].as_str().unwrap_or("?").to_string(),
        light_writers: light["writers"].as_u64().unwrap_or(0),
        light_p50_ms: num(light, "latency_ms_p50"),
        light_p99_ms: num(light, "latency_ms_p99"),
        light_ops_per_s: num(light, "ops_per_second"),
        loaded_ops_per_s: num(loaded, "ops_per_second"),
        loaded_p50_ms: num(loaded, "latency_ms_p50"),
        loaded_p99_ms: num(loaded, "latency_ms_p99"),
        http_ops_per_s: num(http, "ops_per_second"),
        http_p50_ms: num(http, "latency_ms_p50"),
        http_p99_ms: num(http, "latency_ms_p99"),
        single_replica_ops_per_s: num(single, "ops_per_second"),
        fdatasync_per_s: num(sync, "ops_per_second"),
        fdatasync_p50_ms: num(sync, "latency_ms_p50"),
    })
}

// ----- the model -----

/// Costs the model multiplies with rates (seconds, bytes).
#[derive(Debug, Clone, serde::Serialize)]
struct Costs {
    apply: CostCurve,
    sled: CostCurve,
    snapshot_bytes_per_viewer: f64,
    snapshot_encode_s_per_viewer: f64,
    expiry_scan_s_per_viewer: f64,
    snapshot_every_entries: u64,
    expiry_scans_per_s: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
}

/// One (viewers, R, B) point of the model.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Row {
    viewers: usize,
    report_interval_s: f64,
    batch_interval_ms: u64,
    /// Updates in one node's batch after last-write-wins coalescing.
    viewers_per_node_batch: usize,
    /// Viewer updates written per second, cluster-wide (after coalescing).
    updates_per_s: f64,
    entries_per_s: f64,
    forwarded_proposals_per_s: f64,
    /// gRPC bytes/s of forwarded proposals into the leader (99 of the 100 nodes forward).
    leader_ingress_bytes_per_s: f64,
    /// Raft entry data (the `EntryPayload`s) per second: what every replica appends to its log.
    entry_data_bytes_per_s: f64,
    /// `MsgAppend`s in gRPC calls, bytes/s to each follower.
    replication_bytes_per_s_per_follower: f64,
    /// Answers to forwarded proposals, bytes/s out of the leader.
    answer_bytes_per_s: f64,
    /// Leader egress on the wire, bits/s, for 2 and 4 followers and for every node a voter.
    egress_bits_per_s_2: f64,
    egress_bits_per_s_4: f64,
    egress_bits_per_s_all: f64,
    /// Cores busy applying (state machine only; and with the sled transaction).
    apply_cores: f64,
    apply_sled_cores: f64,
    /// Added latency of a viewer update: B/2 + commit p50; B + commit p99.
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    snapshot_bytes: f64,
    snapshot_every_s: f64,
    snapshot_cores: f64,
    expiry_scan_cores: f64,
}

fn egress_bits(row_replication: f64, answers: f64, followers: usize) -> f64 {
    (row_replication * followers as f64 + answers) * WIRE_BYTES_PER_PAYLOAD_BYTE * 8.0
}

fn model(shaper: &mut Shaper, costs: &Costs, viewers: usize, report_s: f64, batch_ms: u64) -> Row {
    let per_node = viewers as f64 / NODES as f64;
    let batch_s = batch_ms as f64 / 1000.0;
    // Periodic writes every R s fall at most once in a window B ≤ R; with B > R a viewer's
    // writes in one window coalesce to one (last write per viewer wins in the batcher).
    let n = (per_node * (batch_s / report_s).min(1.0)).round().max(1.0) as usize;
    let shape = shaper.shape(n);
    let batches_per_s = NODES as f64 / batch_s;
    let entries_per_s = batches_per_s * shape.entries as f64;
    let forwarders = (NODES - 1) as f64 / batch_s;
    let replication = batches_per_s * shape.entry_call_bytes as f64;
    let answers = forwarders * shape.answer_bytes as f64;
    let updates_per_s = batches_per_s * n as f64;
    let apply_cores = batches_per_s * shaper.batch_cost(n, &costs.apply);
    let snapshot_every_s = costs.snapshot_every_entries as f64 / entries_per_s;
    Row {
        viewers,
        report_interval_s: report_s,
        batch_interval_ms: batch_ms,
        viewers_per_node_batch: n,
        updates_per_s,
        entries_per_s,
        forwarded_proposals_per_s: forwarders * shape.proposals as f64,
        leader_ingress_bytes_per_s: forwarders * shape.forward_call_bytes as f64,
        entry_data_bytes_per_s: batches_per_s * shape.entry_data_bytes as f64,
        replication_bytes_per_s_per_follower: replication,
        answer_bytes_per_s: answers,
        egress_bits_per_s_2: egress_bits(replication, answers, FOLLOWERS[0]),
        egress_bits_per_s_4: egress_bits(replication, answers, FOLLOWERS[1]),
        egress_bits_per_s_all: egress_bits(replication, answers, FOLLOWERS_ALL_NODES),
        apply_cores,
        apply_sled_cores: apply_cores + batches_per_s * shaper.batch_cost(n, &costs.sled),
        latency_ms_p50: batch_ms as f64 / 2.0 + costs.commit_p50_ms,
        latency_ms_p99: batch_ms as f64 + costs.commit_p99_ms,
        snapshot_bytes: viewers as f64 * costs.snapshot_bytes_per_viewer,
        snapshot_every_s,
        snapshot_cores: viewers as f64 * costs.snapshot_encode_s_per_viewer / snapshot_every_s,
        expiry_scan_cores: viewers as f64 * costs.expiry_scan_s_per_viewer * costs.expiry_scans_per_s,
    }
}

/// A per-group resource for the limits and the sharding estimate.
struct Limit {
    name: String,
    capacity: f64,
    unit: &'static str,
    need: fn(&Row) -> f64,
}

fn limits(store: &StoreFacts) -> Vec<Limit> {
    let mut limits = Vec::new();
    for link in LINK_BITS_PER_S {
        let gbit = link / 1e9;
        limits.push(Limit {
            name: format!("leader egress, 2 followers (3 voters), {gbit:.0} Gbit/s"),
            capacity: link,
            unit: "bit/s",
            need: |r| r.egress_bits_per_s_2,
        });
        limits.push(Limit {
            name: format!("leader egress, 4 followers (5 voters), {gbit:.0} Gbit/s"),
            capacity: link,
            unit: "bit/s",
            need: |r| r.egress_bits_per_s_4,
        });
    }
    limits.push(Limit {
        name: format!("leader egress, every node a voter ({FOLLOWERS_ALL_NODES} followers, today), 10 Gbit/s"),
        capacity: 1e10,
        unit: "bit/s",
        need: |r| r.egress_bits_per_s_all,
    });
    limits.push(Limit {
        name: "apply: decode + `StateMachine::apply`, one core".into(),
        capacity: 1.0,
        unit: "cores",
        need: |r| r.apply_cores,
    });
    limits.push(Limit {
        name: "apply + sled log append (`LogStore::append`), one core".into(),
        capacity: 1.0,
        unit: "cores",
        need: |r| r.apply_sled_cores,
    });
    limits.push(Limit {
        name: "snapshot encoding every `snapshot_every_entries`, one core".into(),
        capacity: 1.0,
        unit: "cores",
        need: |r| r.snapshot_cores,
    });
    limits.push(Limit {
        name: "leader expiry scan (`due_viewers` every tick), one core".into(),
        capacity: 1.0,
        unit: "cores",
        need: |r| r.expiry_scan_cores,
    });
    if store.loaded_ops_per_s.is_finite() {
        limits.push(Limit {
            name: format!(
                "replicated store end to end (store-latest: in-process, 3 replicas, 256 writers, {} updates/s)",
                thousands(store.loaded_ops_per_s)
            ),
            capacity: store.loaded_ops_per_s,
            unit: "updates/s",
            need: |r| r.updates_per_s,
        });
    }
    limits
}

// ----- formatting -----

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Three significant digits.
fn sig(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    if v.abs() >= 1000.0 {
        thousands(v)
    } else {
        format!("{v:.digits$}")
    }
}

/// Seconds without trailing zeros (2, 0.5, 30).
fn secs(v: f64) -> String {
    format!("{v}")
}

fn mb(bytes_per_s: f64) -> String {
    sig(bytes_per_s / 1e6)
}

fn gbit(bits: f64) -> String {
    sig(bits / 1e9)
}

fn pct(cores: f64) -> String {
    format!("{} %", sig(cores * 100.0))
}

fn main() {
    let args = common::args_or_exit(parse_args());
    let run_start = Instant::now();
    let started = SystemTime::now();
    let load_at_start = common::load_average();
    let facts = common::machine_facts();
    println!(
        "capacity model: {NODES} nodes, {VIEWERS} viewers; {} × {} cores, load {load_at_start}",
        facts.cpu_model, facts.cores
    );

    // The real defaults the model uses.
    let sdk_report = mediamesh_sdk::ClientOptions::default().position_interval;
    let real_report_s = sdk_report.map_or(f64::INFINITY, |d| d.as_secs_f64());
    let store_defaults = StoreConfig::new("capacity-model", std::env::temp_dir(), "unused");
    let mut report_intervals: Vec<f64> = REPORT_INTERVALS_S.to_vec();
    if real_report_s.is_finite() && !report_intervals.contains(&real_report_s) {
        report_intervals.push(real_report_s);
    }
    report_intervals.sort_by(f64::total_cmp);

    // ----- population -----
    let now = now_ms();
    let t0 = Instant::now();
    let population: Vec<ViewerState> = (0..VIEWERS).map(|i| typical_viewer(i, now)).collect();
    for v in population.iter().take(1000) {
        v.validate().expect("a typical viewer is valid");
    }
    println!(
        "  {} viewer states built in {:.2} s",
        population.len(),
        t0.elapsed().as_secs_f64()
    );
    let leader = NodeId::new(node_name(0));
    let follower = NodeId::new(node_name(1));
    let proposer = raft_id_for(&follower);
    let framing = AppendFraming {
        to: raft_id_for(&follower),
        from: raft_id_for(&leader),
        term: TERM,
        index: TYPICAL_INDEX,
    };
    let from_addr = "10.20.30.101:7000".to_string();

    // ----- sizes -----
    let typical = &population[0];
    let typical_record = codec::encode(&stored(typical, TYPICAL_INDEX)).len();
    let typical_in_entry = codec::encode(typical).len() - 1;
    let chosen = viewer_with_choices(typical);
    let chosen_record = codec::encode(&stored(&chosen, TYPICAL_INDEX)).len();
    let chosen_in_entry = codec::encode(&chosen).len() - 1;
    let mut shaper = Shaper {
        states: &population,
        framing,
        proposer,
        from_addr: from_addr.clone(),
        cache: HashMap::new(),
        entry_viewers: HashMap::new(),
    };
    let size_rows: Vec<BatchShape> = SIZE_TABLE_N.iter().map(|&n| shaper.shape(n)).collect();
    let marginal_viewer_bytes =
        (shaper.shape(1024).entry_data_bytes - shaper.shape(1).entry_data_bytes) as f64 / 1023.0;
    let heartbeat_entry = codec::encode(&EntryPayload {
        proposer,
        batch_id: u64::MAX / 3,
        commands: vec![Command::Heartbeat {
            node: follower.clone(),
            load: NodeLoad {
                cpu: 0.42,
                connections: 812,
                rooms: 37,
                egress_bps: 1_200_000_000,
            },
            at_ms: now,
        }],
    })
    .len();
    let delete_entry = codec::encode(&EntryPayload {
        proposer,
        batch_id: u64::MAX / 3,
        commands: vec![Command::DeleteViewer {
            viewer: typical.viewer.clone(),
        }],
    })
    .len();

    // Raft framing, checked against the real decoder.
    let data_one = codec::encode(&EntryPayload {
        proposer,
        batch_id: u64::MAX / 3,
        commands: vec![Command::UpsertViewers {
            viewers: vec![typical.clone()],
        }],
    });
    let data_big = codec::encode(&EntryPayload {
        proposer,
        batch_id: u64::MAX / 3,
        commands: vec![Command::UpsertViewers {
            viewers: population[..1024].to_vec(),
        }],
    });
    let entries = vec![
        framing.entry(TYPICAL_INDEX + 1, &data_one),
        framing.entry(TYPICAL_INDEX + 2, &data_big),
    ];
    let message = framing.message(&entries);
    let batch = pb::RaftBatch {
        from_raft_id: framing.from,
        from_addr: from_addr.clone(),
        messages: vec![message.clone()],
    };
    let decoded = mediamesh_cluster::transport::decode_raft_batch(&batch, framing.to)
        .expect("the real raft decoder reads the hand-encoded MsgAppend");
    let m = &decoded[0];
    assert_eq!(format!("{:?}", m.get_msg_type()), "MsgAppend");
    assert_eq!(
        (m.to, m.from, m.term, m.index, m.commit),
        (framing.to, framing.from, TERM, TYPICAL_INDEX, TYPICAL_INDEX)
    );
    let got = m.get_entries();
    assert_eq!(got.len(), 2);
    for (entry, (index, data)) in got
        .iter()
        .zip([(TYPICAL_INDEX + 1, &data_one), (TYPICAL_INDEX + 2, &data_big)])
    {
        assert_eq!((entry.index, entry.term, &entry.data[..]), (index, TERM, &data[..]));
        assert_eq!(format!("{:?}", entry.get_entry_type()), "EntryNormal");
    }
    for data in [&data_one, &data_big] {
        let built = framing.message(&[framing.entry(TYPICAL_INDEX + 1, data)]).len();
        assert_eq!(built, framing.message_len_one_entry(data.len()), "framing arithmetic");
    }
    let entry_framing_bytes = entries[1].len() - data_big.len();
    let message_header_bytes = message.len()
        - entries
            .iter()
            .map(|e| 1 + varint_len(e.len() as u64) + e.len())
            .sum::<usize>();
    let raft_batch_bytes = batch.encoded_len() - message.len();
    let per_entry_raft_overhead =
        raft_batch_call_bytes(proposer, &from_addr, framing.message_len_one_entry(data_big.len())) - data_big.len();
    println!(
        "  sizes: viewer {typical_in_entry} B in an entry ({typical_record} B stored), {marginal_viewer_bytes:.1} B per extra viewer; \
         raft entry framing {entry_framing_bytes} B, MsgAppend header {message_header_bytes} B, RaftBatch {raft_batch_bytes} B"
    );

    // ----- apply: 1M distinct viewers as two state machines of VIEWERS_MAX -----
    assert_eq!(
        VIEWERS_MAX * 2,
        VIEWERS,
        "the bench splits 1M viewers into two full state machines"
    );
    let shard_orders: [Vec<usize>; 2] = [(0..VIEWERS_MAX).collect(), (VIEWERS_MAX..VIEWERS).collect()];
    let t0 = Instant::now();
    let insert_entries: Vec<Vec<Vec<u8>>> = shard_orders
        .iter()
        .map(|o| encode_entries(&population, o, VIEWERS_PER_UPSERT_MAX, proposer))
        .collect();
    // Updates two seconds later, in random order (a node's batch holds its viewers in any order).
    let updated: Vec<ViewerState> = population
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.position_ms += 2_000;
            v.updated_at_ms += 2_000;
            v
        })
        .collect();
    let update_entries: Vec<Vec<Vec<u8>>> = shard_orders
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut o = o.clone();
            o.shuffle(&mut rand::rngs::StdRng::seed_from_u64(i as u64 + 1));
            encode_entries(&updated, &o, VIEWERS_PER_UPSERT_MAX, proposer)
        })
        .collect();
    println!("  entries encoded in {:.2} s", t0.elapsed().as_secs_f64());
    let mut shards = [StateMachine::default(), StateMachine::default()];
    let mut insert = ApplyTiming::default();
    for (sm, entries) in shards.iter_mut().zip(&insert_entries) {
        insert.add(&apply_entries(sm, entries));
    }
    assert_eq!(insert.viewers, VIEWERS);
    assert!(shards.iter().all(|s| s.viewers().len() == VIEWERS_MAX));
    println!(
        "  insert of {} viewers: {:.2} s wall, {:.2} s CPU, {:.0} viewers per CPU-second",
        insert.viewers,
        insert.wall_s,
        insert.cpu_s,
        insert.viewers_per_s()
    );
    // One viewer more is refused: VIEWERS_MAX is a hard limit of one group.
    let extra = typical_viewer(VIEWERS, now);
    let index = shards[0].applied().index + 1;
    let refusal = match shards[0]
        .apply(index, TERM, vec![Command::UpsertViewers { viewers: vec![extra] }])
        .pop()
    {
        Some(Outcome::Rejected(reason)) => reason,
        other => panic!("a viewer beyond VIEWERS_MAX was not refused: {other:?}"),
    };
    let mut update_passes = Vec::new();
    for pass in 0..APPLY_REPEATS {
        let mut t = ApplyTiming::default();
        for (sm, entries) in shards.iter_mut().zip(&update_entries) {
            t.add(&apply_entries(sm, entries));
        }
        println!(
            "  update pass {}: {:.2} s wall, {:.2} s CPU, {:.0} viewers and {:.0} entries per CPU-second; apply alone {:.0} viewers/s",
            pass + 1,
            t.wall_s,
            t.cpu_s,
            t.viewers_per_s(),
            t.entries_per_s(),
            t.viewers as f64 / t.apply_s.max(1e-9)
        );
        update_passes.push(t);
    }
    // Best pass by the thread's CPU time (the machine is shared with other builds).
    let best_update = *update_passes
        .iter()
        .min_by(|a, b| a.cpu_s.total_cmp(&b.cpu_s))
        .expect("APPLY_REPEATS ≥ 1");

    // Per-entry cost: entries of SWEEP_ENTRY_SIZES viewers over the same random viewers.
    let mut sweep_order: Vec<usize> = (0..VIEWERS_MAX).collect();
    sweep_order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    sweep_order.truncate(SWEEP_VIEWERS);
    // Rounds over all sizes, so a busy moment of the shared machine hits every size alike; the
    // least CPU per size is kept.
    let sweep_entries: Vec<(usize, Vec<Vec<u8>>)> = SWEEP_ENTRY_SIZES
        .iter()
        .map(|&n| (n, encode_entries(&updated, &sweep_order, n, proposer)))
        .collect();
    let mut best: Vec<Option<ApplyTiming>> = vec![None; sweep_entries.len()];
    for _ in 0..SWEEP_ROUNDS {
        for ((_, entries), best) in sweep_entries.iter().zip(best.iter_mut()) {
            let t = apply_entries(&mut shards[0], entries);
            if best.is_none_or(|b| t.cpu_s < b.cpu_s) {
                *best = Some(t);
            }
        }
    }
    let mut sweep = Vec::new();
    for ((n, _), best) in sweep_entries.iter().zip(best) {
        // SWEEP_ROUNDS ≥ 1.
        let best = best.expect("measured");
        println!(
            "  {n:>4} viewers per entry: {:.2} CPU µs per entry, {:.3} per viewer",
            best.us_per_entry(),
            best.us_per_entry() / *n as f64
        );
        sweep.push((*n, best));
    }
    drop(sweep_entries);
    let apply_curve = CostCurve {
        points: sweep.iter().map(|(n, t)| (*n, t.cpu_s / t.entries as f64)).collect(),
    };

    // Whole-state operations at VIEWERS_MAX (both shards: 1M).
    let whole: Vec<WholeState> = shards.iter().map(|sm| measure_whole_state(sm, now + 2_000)).collect();
    let w = whole[0];
    println!(
        "  500k viewers: snapshot {:.1} MB, encode {:.3} s, decode {:.3} s, digest {:.3} s, expiry scan {:.4} s",
        w.snapshot_bytes as f64 / 1e6,
        w.encode_snapshot_s,
        w.decode_snapshot_s,
        w.digest_s,
        w.expiry_scan_s
    );
    let snapshot_bytes_1m: usize = whole.iter().map(|w| w.snapshot_bytes).sum();
    let encode_s_1m: f64 = whole.iter().map(|w| w.encode_snapshot_s).sum();
    drop(shards);
    drop(insert_entries);
    drop(update_entries);

    // sled.
    let (sled, sled_curve) = match measure_sled(&updated, proposer) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sled measurement failed: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "  sled log append: {:.0} viewers/s inserted, {:.0} updated (entries of 1024), {:.0} one-viewer entries/s",
        sled.insert_viewers_per_s, sled.update_viewers_per_s, sled.single_entries_per_s
    );

    // The replicated store, as measured by `cargo bench --bench store`.
    let store = match read_store_facts(&args.store_results) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot read the store benchmark's results ({e}); run `cargo bench --bench store` first");
            std::process::exit(2);
        }
    };

    let costs = Costs {
        apply: apply_curve.clone(),
        sled: sled_curve.clone(),
        snapshot_bytes_per_viewer: snapshot_bytes_1m as f64 / VIEWERS as f64,
        snapshot_encode_s_per_viewer: encode_s_1m / VIEWERS as f64,
        expiry_scan_s_per_viewer: whole.iter().map(|w| w.expiry_scan_s).sum::<f64>() / VIEWERS as f64,
        snapshot_every_entries: store_defaults.snapshot_every_entries,
        expiry_scans_per_s: 1000.0 / store_defaults.tick_ms as f64,
        commit_p50_ms: store.light_p50_ms,
        commit_p99_ms: store.light_p99_ms,
    };

    // ----- the model -----
    let mut rows = Vec::new();
    for &r in &report_intervals {
        for &b in &BATCH_INTERVALS_MS {
            rows.push(model(&mut shaper, &costs, VIEWERS, r, b));
        }
    }
    let limit_list = limits(&store);
    let real_rows: Vec<Row> = LIMIT_BATCH_INTERVALS_MS
        .iter()
        .map(|&b| model(&mut shaper, &costs, VIEWERS, real_report_s, b))
        .collect();
    // Largest viewer count per group under each limit (linear from the 1M point: the per-viewer
    // terms dominate; the per-entry terms do not grow with viewers, so this errs low).
    let max_viewers = |limit: &Limit, row: &Row| VIEWERS as f64 * limit.capacity / (limit.need)(row);
    let snapshot_cap_viewers = SNAPSHOT_BYTES_MAX as f64 / costs.snapshot_bytes_per_viewer;

    // Sharding: the fewest groups G such that each group (1M/G viewers, every node still
    // batching to every group) stays within TARGET_UTILISATION of each resource.
    let sharding_limits: Vec<&Limit> = limit_list
        .iter()
        .filter(|l| l.unit != "bit/s" || (l.capacity == SHARDING_LINK_BITS_PER_S && !l.name.contains("every node")))
        .filter(|l| !l.name.contains("4 followers"))
        .collect();
    let mut sharding = Vec::new();
    for l in &sharding_limits {
        let mut groups_full = None;
        let mut groups_target = None;
        for g in 1..=10_000usize {
            let row = model(
                &mut shaper,
                &costs,
                VIEWERS.div_ceil(g),
                SHARDING_REPORT_INTERVAL_S,
                SHARDING_BATCH_INTERVAL_MS,
            );
            let need = (l.need)(&row);
            if groups_full.is_none() && need <= l.capacity {
                groups_full = Some(g);
            }
            if need <= l.capacity * TARGET_UTILISATION {
                groups_target = Some(g);
                break;
            }
        }
        let at_one = (l.need)(&model(
            &mut shaper,
            &costs,
            VIEWERS,
            SHARDING_REPORT_INTERVAL_S,
            SHARDING_BATCH_INTERVAL_MS,
        ));
        sharding.push((l.name.clone(), at_one, l.capacity, l.unit, groups_full, groups_target));
    }
    let groups_viewers_max = VIEWERS.div_ceil(VIEWERS_MAX);
    let groups_snapshot = (VIEWERS as f64 / snapshot_cap_viewers).ceil() as usize;

    let run_s = run_start.elapsed().as_secs_f64();
    let load_at_end = common::load_average();

    // ----- the report -----
    let (date, stamp) = common::report_time(started);
    let commit = common::git_commit(&["cluster", "src/signal", "sdk/src", "actors/src"]);
    let mut md = String::new();
    let _ = writeln!(md, "# Capacity model of one Raft group — {date}\n");
    let _ = writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM; load average {load_at_start} at the start, {load_at_end} at the end \
         (other builds were running: times are the best of {APPLY_REPEATS}); commit {commit}; run time {run_s:.0} s",
        facts.cpu_model, facts.cores, facts.memory_gib
    );
    let _ = writeln!(
        md,
        "- scenario: {NODES} nodes, {} viewers (control plane only), {} per node; each viewer's state written every R s, \
         each node proposing its viewers' updates every B ms",
        thousands(VIEWERS as f64),
        thousands((VIEWERS / NODES) as f64)
    );
    let _ = writeln!(
        md,
        "- real cadence: the Rust SDK reports the position every **{} s** (`ClientOptions::default().position_interval`); \
         the browser SDK only when `reportPositionMs` is set (default 0: writes on join, track and layer changes and at the \
         end of the session). The node writes every report (`In::Position` → `persist` → `persist_viewer`, a watch \
         channel: at most one write in flight per viewer, later reports coalesce) through the node's batcher \
         (`run_viewer_batcher`: last write per viewer wins, ≤ {} viewers per proposal, ≤ 4 proposals in flight, \
         proposes at once when idle and lingers `viewer_batch_ms` = {} ms when busy, so under load it is self-clocked \
         at roughly B ≈ 5–10 ms)",
        secs(real_report_s),
        VIEWERS_PER_UPSERT_MAX,
        store_defaults.viewer_batch_ms
    );
    let _ = writeln!(
        md,
        "- store inputs read from `benches/results/{}` ({}, commit {}), not re-run\n",
        store.source, store.date, store.git_commit
    );

    let _ = writeln!(md, "## Measured inputs\n");
    let _ = writeln!(md, "### Sizes (`codec::encode`, bincode 2 with a version byte)\n");
    let _ = writeln!(md, "| what | bytes |");
    let _ = writeln!(md, "|---|---:|");
    let _ = writeln!(
        md,
        "| typical `ViewerState` in an entry (UUIDv7 viewer and session ids, `room-00042`, `seoul-001`, masked name `{}`, \
         position, no subscriptions or layer, `updated_at_ms`) | {typical_in_entry} |",
        typical.display_name
    );
    let _ = writeln!(
        md,
        "| the same as stored (`expires_at_ms`, `revision` set; one sled record, one answer element) | {typical_record} |"
    );
    let _ = writeln!(
        md,
        "| with two subscriptions and a layer (`<publisher>/video`, `<publisher>/audio`, `video → high`): in an entry / stored | \
         {chosen_in_entry} / {chosen_record} |"
    );
    let _ = writeln!(
        md,
        "| each further viewer in an `EntryPayload` | {marginal_viewer_bytes:.1} |"
    );
    let _ = writeln!(
        md,
        "| `EntryPayload` with one `Heartbeat` (a node's load, every {NODE_HEARTBEAT_INTERVAL_MS} ms per node) | {heartbeat_entry} |"
    );
    let _ = writeln!(
        md,
        "| `EntryPayload` with one `DeleteViewer` (each leave, proposed on its own) | {delete_entry} |"
    );
    let _ = writeln!(
        md,
        "| raft framing of an entry (`eraftpb::Entry`: term, index, data tag + length) | {entry_framing_bytes} |"
    );
    let _ = writeln!(
        md,
        "| `MsgAppend` header (type, to, from, term, log term, index, commit; raft ids are SHA-256-derived u64s) | {message_header_bytes} |"
    );
    let _ = writeln!(
        md,
        "| `RaftBatch` around one message (prost `encoded_len`: from id, from address, length) | {raft_batch_bytes} |"
    );
    let _ = writeln!(
        md,
        "| all of it per entry sent to one follower, as one gRPC call (+ {GRPC_CALL_HEADERS_BYTES} B estimated HTTP/2 headers) | {per_entry_raft_overhead} |\n"
    );
    let _ = writeln!(
        md,
        "The raft framing is written with the protobuf wire format and decoded by the real transport \
         (`transport::decode_raft_batch`, raft-rs 0.7's rust-protobuf decoder): type, ids, index, term and data read back \
         equal. Wire bytes add TCP/IP and Ethernet framing: × {WIRE_BYTES_PER_PAYLOAD_BYTE:.3} (1500-byte MTU).\n"
    );
    let _ = writeln!(
        md,
        "One node's batch of N updates (entries packed as `issue_proposals` packs them: ≤ {} MiB and ≤ {} commands per entry; \
         one forwarded proposal per {} viewers):\n",
        ENTRY_BYTES_MAX / 2 / (1024 * 1024),
        COMMANDS_PER_ENTRY_MAX,
        VIEWERS_PER_UPSERT_MAX
    );
    let _ = writeln!(
        md,
        "| N | proposals | entries | entry data bytes | bytes per viewer | to one follower (gRPC) | forwarded to the leader (gRPC) | leader's answer |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &size_rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            thousands(s.viewers as f64),
            s.proposals,
            s.entries,
            thousands(s.entry_data_bytes as f64),
            s.entry_data_bytes as f64 / s.viewers as f64,
            thousands(s.entry_call_bytes as f64),
            thousands(s.forward_call_bytes as f64),
            thousands(s.answer_bytes as f64)
        );
    }
    let _ = writeln!(
        md,
        "\nThe leader answers a forwarded upsert with `Outcome::Upserted {{ index, ttl_ms, kept }}` (forwarded-outcome \
         version 2): only the viewers whose stored state refused the update come back, so the answer no longer grows \
         with the batch (version 1 sent every stored state again, as large as one follower's copy).\n"
    );

    let _ = writeln!(md, "### Apply: decode + `StateMachine::apply`, one thread\n");
    let _ = writeln!(
        md,
        "{} distinct viewers in `UpsertViewers` entries of {}: one state machine refuses more than `VIEWERS_MAX` = {} \
         viewer states (the next one got `Rejected(\"{refusal}\")`), so they are applied as two state machines of {} each. \
         Update passes apply new positions for all of them in random order.\n",
        thousands(VIEWERS as f64),
        VIEWERS_PER_UPSERT_MAX,
        thousands(VIEWERS_MAX as f64),
        thousands(VIEWERS_MAX as f64)
    );
    let _ = writeln!(
        md,
        "| pass | viewers | entries | wall s | CPU s (thread) | decode s (wall) | viewers per CPU-second | entries per CPU-second |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut pass_line = |name: &str, t: &ApplyTiming| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            thousands(t.viewers as f64),
            thousands(t.entries as f64),
            t.wall_s,
            t.cpu_s,
            t.decode_s,
            thousands(t.viewers_per_s()),
            thousands(t.entries_per_s())
        );
    };
    pass_line("insert (new viewers)", &insert);
    for (i, t) in update_passes.iter().enumerate() {
        pass_line(&format!("update {}", i + 1), t);
    }
    let _ = writeln!(
        md,
        "\n**Apply throughput (best update pass, by the thread's CPU time): {} viewers/s, {} entries/s of {} on one \
         core.** Wall time was {:.1}× the CPU time, and the passes' CPU times differ by up to {:.1}×: the two cores were \
         shared with other builds and tests (caches and memory bandwidth included), so these numbers are noisy; an idle \
         machine should do at least as well as the best pass.\n",
        thousands(best_update.viewers_per_s()),
        thousands(best_update.entries_per_s()),
        VIEWERS_PER_UPSERT_MAX,
        best_update.wall_s / best_update.cpu_s,
        update_passes.iter().map(|t| t.cpu_s).fold(0.0, f64::max) / best_update.cpu_s
    );
    let apply_alone = best_update.viewers as f64 / best_update.apply_s.max(1e-9);
    let decode_alone = best_update.viewers as f64 / best_update.decode_s.max(1e-9);
    let _ = writeln!(
        md,
        "**Apply alone** (`StateMachine::apply` of decoded entries of {} updates into states of {} viewers, the \
         same pass): **{} viewer updates/s** on one core (aim ≥ 1,000,000: {}); decoding the entries (bincode) \
         alone: {} viewers/s.\n",
        VIEWERS_PER_UPSERT_MAX,
        thousands(VIEWERS_MAX as f64),
        thousands(apply_alone),
        if apply_alone >= 1_000_000.0 { "met" } else { "NOT met" },
        thousands(decode_alone)
    );
    let _ = writeln!(
        md,
        "| viewers per entry | CPU µs per entry | CPU µs per viewer | entries per CPU-second |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    for (n, t) in &sweep {
        let _ = writeln!(
            md,
            "| {n} | {:.2} | {:.3} | {} |",
            t.us_per_entry(),
            t.us_per_entry() / *n as f64,
            thousands(t.entries_per_s())
        );
    }
    let _ = writeln!(
        md,
        "\nLeast CPU of {SWEEP_ROUNDS} rounds over all sizes, the same {} random viewers of a full 500,000-viewer state machine each time. A viewer \
         costs more in a large entry than in a small one. Likely causes: the working set of one apply (decoded states, \
         their clones in the write list and in the outcome) outgrows the caches and the allocator, and `UpsertViewers` \
         looks every viewer up twice (once to count new ones against `VIEWERS_MAX`, once to insert), which a small entry \
         does while the path is still cached. The model uses these points: linear between them, per \
         viewer beyond 1,024.\n",
        thousands(SWEEP_VIEWERS as f64)
    );
    let _ = writeln!(
        md,
        "### sled log append of each entry (`LogStore::append`, no flush), one thread\n"
    );
    let _ = writeln!(
        md,
        "{} viewers, CPU time of the writing thread: inserted at {} viewers/s, **updated at {} viewers/s** (entries of \
         1,024, best of {APPLY_REPEATS}); entries of one viewer: {} transactions/s ({:.1} µs each). Between 1 and 1,024 \
         viewers per entry the model interpolates linearly. Not included: sled's background flusher thread, the raft log \
         append (`Disk::append`) and the flush (the store benchmark measures the whole path).\n",
        thousands(SLED_VIEWERS as f64),
        thousands(sled.insert_viewers_per_s),
        thousands(sled.update_viewers_per_s),
        thousands(sled.single_entries_per_s),
        1e6 / sled.single_entries_per_s
    );
    let _ = writeln!(md, "### Whole-state operations, one state machine of 500,000 viewers\n");
    let _ = writeln!(md, "| operation | CPU ms (wall ms) | notes |");
    let _ = writeln!(md, "|---|---:|---|");
    let _ = writeln!(
        md,
        "| `encode_snapshot` | {:.0} ({:.0}) | {} MB ({:.0} B per viewer); 1M viewers: {} MB (limit `SNAPSHOT_BYTES_MAX` = {} MiB). Encoded off the apply path (a copy-on-write clone of the state, encoded on a blocking thread) every `snapshot_every_entries` = {} entries or 64 MiB of log |",
        w.encode_snapshot_s * 1e3,
        w.encode_snapshot_wall_s * 1e3,
        sig(w.snapshot_bytes as f64 / 1e6),
        costs.snapshot_bytes_per_viewer,
        sig(snapshot_bytes_1m as f64 / 1e6),
        SNAPSHOT_BYTES_MAX / (1024 * 1024),
        thousands(costs.snapshot_every_entries as f64)
    );
    let _ = writeln!(
        md,
        "| `decode_snapshot` (+ invariants) | {:.0} ({:.0}) | a follower installing a snapshot, a restarted replica |",
        w.decode_snapshot_s * 1e3,
        w.decode_snapshot_wall_s * 1e3
    );
    let _ = writeln!(
        md,
        "| `digest` | {:.0} ({:.0}) | computed by `Store::status` (`GET /admin/v1/cluster?digest=true` only, since this measurement) under the state read lock: apply waits |",
        w.digest_s * 1e3,
        w.digest_wall_s * 1e3
    );
    let _ = writeln!(
        md,
        "| `due_viewers` (nothing due) | {:.1} ({:.1}) | the leader's expiry scan, every {} ms tick: {} of a core at 500,000 viewers |\n",
        w.expiry_scan_s * 1e3,
        w.expiry_scan_wall_s * 1e3,
        store_defaults.tick_ms,
        pct(w.expiry_scan_s * costs.expiry_scans_per_s)
    );
    let _ = writeln!(md, "### The replicated store (from `{}`)\n", store.source);
    let _ = writeln!(
        md,
        "- commit latency at light load (`store in-process`, 3 replicas, {} writers): p50 **{:.2} ms**, p99 {:.2} ms \
         ({:.0} commits/s); the model's added latency uses these",
        store.light_writers, store.light_p50_ms, store.light_p99_ms, store.light_ops_per_s
    );
    let _ = writeln!(
        md,
        "- throughput under load (256 writers): in-process **{} updates/s** (p50 {:.1} ms, p99 {:.1} ms); over HTTP, three \
         node processes: {} updates/s (p99 {:.1} ms); one replica: {} updates/s. All replicas and clients share 2 cores.",
        thousands(store.loaded_ops_per_s),
        store.loaded_p50_ms,
        store.loaded_p99_ms,
        thousands(store.http_ops_per_s),
        store.http_p99_ms,
        thousands(store.single_replica_ops_per_s)
    );
    let _ = writeln!(
        md,
        "- a 4 KiB append + fdatasync: {} /s (p50 {:.2} ms) — the most flushes one disk does one after another\n",
        thousands(store.fdatasync_per_s),
        store.fdatasync_p50_ms
    );

    let _ = writeln!(
        md,
        "## The model: {NODES} nodes, {} viewers\n",
        thousands(VIEWERS as f64)
    );
    let _ = writeln!(
        md,
        "Per node and batch: N = {} × min(1, B/R) updates (with B > R a viewer's writes in one batch coalesce to one). \
         Entries/s = {NODES} × entries per batch ÷ B (an upper bound: the leader also merges proposals that arrive in the same \
         turn, up to 2 MiB, which lowers entries/s but not bytes). Into the leader: the forwarded proposals of {} nodes. Out of \
         the leader: each entry to each follower as a `MsgAppend` (one call per entry: an upper bound on framing) plus the \
         answers to the forwarded proposals, on the wire. Apply = the measured CPU cost of each entry at its size (above), \
         summed, as a share of one core; \"+ sled\" adds the sled log append. Added latency = B/2 + commit p50 (and B + \
         commit p99). MB = 10⁶ bytes.\n",
        thousands((VIEWERS / NODES) as f64),
        NODES - 1
    );
    for &r in &report_intervals {
        let real = if (r - real_report_s).abs() < 1e-9 {
            " — the SDK's cadence"
        } else {
            ""
        };
        let _ = writeln!(md, "### R = {} s{real}\n", secs(r));
        let _ = writeln!(
            md,
            "| B ms | updates per node batch | updates/s | entries/s | into leader MB/s | to each follower MB/s | answers MB/s | \
             leader egress Gbit/s, 2 / 4 followers | all {} nodes voting | apply % of a core (+ sled) | added latency ms p50 / p99 |",
            NODES
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows.iter().filter(|x| x.report_interval_s == r) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} ({}) | {} / {} |",
                row.batch_interval_ms,
                thousands(row.viewers_per_node_batch as f64),
                thousands(row.updates_per_s),
                thousands(row.entries_per_s),
                mb(row.leader_ingress_bytes_per_s),
                mb(row.replication_bytes_per_s_per_follower),
                mb(row.answer_bytes_per_s),
                gbit(row.egress_bits_per_s_2),
                gbit(row.egress_bits_per_s_4),
                gbit(row.egress_bits_per_s_all),
                pct(row.apply_cores),
                pct(row.apply_sled_cores),
                sig(row.latency_ms_p50),
                sig(row.latency_ms_p99)
            );
        }
        let _ = writeln!(md);
    }
    let heartbeats_per_s = NODES as f64 * 1000.0 / NODE_HEARTBEAT_INTERVAL_MS as f64;
    let _ = writeln!(
        md,
        "Besides viewers: node heartbeats are {} proposals/s ({NODES} nodes every {NODE_HEARTBEAT_INTERVAL_MS} ms, {heartbeat_entry} B \
         each, {} MB/s per follower) and every leave is its own `DeleteViewer` proposal ({delete_entry} B): with 30-minute \
         sessions, 1M viewers leave at {} /s.\n",
        thousands(heartbeats_per_s),
        sig(heartbeats_per_s * (heartbeat_entry + per_entry_raft_overhead) as f64 / 1e6),
        thousands(VIEWERS as f64 / 1800.0)
    );

    let _ = writeln!(md, "## Where one Raft group stops being enough\n");
    let _ = writeln!(
        md,
        "At the SDK's cadence (R = {} s) with B = {} ms. \"Need\" is at 1,000,000 viewers; \"one group holds\" scales the need \
         linearly to the capacity (per-entry costs do not grow with viewers, so this errs low).\n",
        secs(real_report_s),
        LIMIT_BATCH_INTERVALS_MS
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let fmt_need = |l: &Limit, v: f64| match l.unit {
        "bit/s" => format!("{} Gbit/s", gbit(v)),
        "cores" => pct(v),
        _ => format!("{} updates/s", thousands(v)),
    };
    let fmt_cap = |l: &Limit| match l.unit {
        "bit/s" => format!("{} Gbit/s", l.capacity / 1e9),
        "cores" => "1 core".to_string(),
        _ => format!("{} updates/s", thousands(l.capacity)),
    };
    // (name, capacity, need at 1M per B, viewers one group holds per B), then sorted by what
    // one group holds at the middle B.
    let mut table: Vec<(String, String, String, Vec<f64>)> = vec![
        (
            "viewer states one state machine accepts (`VIEWERS_MAX`)".into(),
            thousands(VIEWERS_MAX as f64),
            thousands(VIEWERS as f64),
            vec![VIEWERS_MAX as f64; LIMIT_BATCH_INTERVALS_MS.len()],
        ),
        (
            "snapshot size (`SNAPSHOT_BYTES_MAX`)".into(),
            format!("{} MiB", SNAPSHOT_BYTES_MAX / (1024 * 1024)),
            format!("{} MiB", sig(snapshot_bytes_1m as f64 / (1024.0 * 1024.0))),
            vec![snapshot_cap_viewers; LIMIT_BATCH_INTERVALS_MS.len()],
        ),
    ];
    let mut limit_json = Vec::new();
    for l in &limit_list {
        let needs: Vec<f64> = real_rows.iter().map(|r| (l.need)(r)).collect();
        let maxes: Vec<f64> = real_rows.iter().map(|r| max_viewers(l, r)).collect();
        table.push((
            l.name.clone(),
            fmt_cap(l),
            needs.iter().map(|v| fmt_need(l, *v)).collect::<Vec<_>>().join(" / "),
            maxes.clone(),
        ));
        limit_json.push(json!({
            "limit": l.name, "capacity": l.capacity, "unit": l.unit,
            "batch_intervals_ms": LIMIT_BATCH_INTERVALS_MS, "need_at_1m": needs, "max_viewers": maxes,
        }));
    }
    table.sort_by(|a, b| a.3[1].total_cmp(&b.3[1]));
    let _ = writeln!(
        md,
        "| limit | capacity | need at 1M viewers | one group holds (viewers) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, capacity, need, maxes) in &table {
        let _ = writeln!(
            md,
            "| {name} | {capacity} | {need} | {} |",
            maxes.iter().map(|v| thousands(*v)).collect::<Vec<_>>().join(" / ")
        );
    }
    let r100 = real_rows[1];
    let _ = writeln!(
        md,
        "\nAt R = {} s, B = {} ms and 1M viewers: entries/s {} against {} fdatasync/s measured (above it, entries share a \
         flush: raft writes all new entries of a Ready before one flush, so it costs latency, not throughput; B ≥ {} ms keeps \
         one flush per entry); raft log written per replica {} GB/h (compacted every {} entries, i.e. every {} s, so the log \
         on disk stays near {} MB); snapshots of {} MB every {} s = {} MB/s written per replica, each encoded off the apply path (a blocking thread busy \
         {} ms for each encode).\n",
        secs(real_report_s),
        r100.batch_interval_ms,
        thousands(r100.entries_per_s),
        thousands(store.fdatasync_per_s),
        thousands((NODES as f64 / store.fdatasync_per_s * 1000.0).ceil()),
        sig(r100.entry_data_bytes_per_s * 3600.0 / 1e9),
        thousands(costs.snapshot_every_entries as f64),
        sig(r100.snapshot_every_s),
        sig(r100.entry_data_bytes_per_s * r100.snapshot_every_s / 1e6),
        sig(r100.snapshot_bytes / 1e6),
        sig(r100.snapshot_every_s),
        sig(r100.snapshot_bytes / r100.snapshot_every_s / 1e6),
        sig(encode_s_1m * 1e3)
    );

    // Conclusions, from the sorted table.
    let held = |needle: &str| {
        table
            .iter()
            .find(|row| row.0.contains(needle))
            .map_or(f64::NAN, |row| row.3[1])
    };
    let answer_share = format!(
        "{:.0} %",
        100.0 * r100.answer_bytes_per_s / (r100.answer_bytes_per_s + 2.0 * r100.replication_bytes_per_s_per_follower)
    );
    let _ = writeln!(
        md,
        "### What runs out first (R = {} s, B = {} ms: the middle column above)\n",
        secs(real_report_s),
        r100.batch_interval_ms
    );
    let _ = writeln!(
        md,
        "1. **Today's whole write path: {} viewers.** The replicated store as measured (`{}`: in-process, 3 replicas, 256 \
         writers, {} updates/s on 2 shared cores) is {}× short of the {} updates/s that 1M viewers at R = {} s write. \
         benches/README.md finds that path CPU-bound on per-entry work (thread hand-offs, ≈85 updates per entry), so this \
         is the pessimistic bound; it is what a deployment gets today.",
        thousands(held("end to end")),
        store.source,
        thousands(store.loaded_ops_per_s),
        sig(r100.updates_per_s / store.loaded_ops_per_s),
        thousands(r100.updates_per_s),
        secs(real_report_s)
    );
    let _ = writeln!(
        md,
        "2. **Apply CPU on the replica thread: {} viewers per group.** Measured per-update costs, summed: the state machine \
         alone needs {} of a core at 1M viewers, with the sled log append {}. This is the binding resource once the per-entry \
         overheads of item 1 are gone, and it binds far below `VIEWERS_MAX`.",
        thousands(held("apply + sled")),
        pct(r100.apply_cores),
        pct(r100.apply_sled_cores)
    );
    let _ = writeln!(
        md,
        "3. **Every node a voter: {} viewers at 10 Gbit/s.** Each joining node is promoted to voter today, so with {NODES} \
         nodes the leader sends every entry {FOLLOWERS_ALL_NODES} times ({} Gbit/s at 1M viewers) and a commit waits for {} \
         acknowledgements.",
        thousands(held("every node")),
        gbit(r100.egress_bits_per_s_all),
        NODES / 2
    );
    let _ = writeln!(
        md,
        "4. **The code's own limit: {} viewer states per group** (`VIEWERS_MAX`): 1M viewers need two groups at any cadence. \
         The snapshot limit ({} MiB) would stop a group at {} viewers; at 1M a snapshot is {} MB, written every {} s at \
         B = {} ms, each one {} ms of encoding on a blocking thread (off the apply path: apply goes on from a copy-on-write view).",
        thousands(VIEWERS_MAX as f64),
        SNAPSHOT_BYTES_MAX / (1024 * 1024),
        thousands(snapshot_cap_viewers),
        sig(r100.snapshot_bytes / 1e6),
        sig(r100.snapshot_every_s),
        r100.batch_interval_ms,
        thousands(encode_s_1m * 1e3)
    );
    let _ = writeln!(
        md,
        "5. **Leader egress with 3 voters: {} Gbit/s at 1M viewers**, so a 1 Gbit/s link holds {} viewers and 10 Gbit/s {} \
         (5 voters: {} and {}). The answers to forwarded proposals (version 2: only the refused viewers come back) are {} of it.",
        gbit(r100.egress_bits_per_s_2),
        thousands(VIEWERS as f64 * 1e9 / r100.egress_bits_per_s_2),
        thousands(VIEWERS as f64 * 1e10 / r100.egress_bits_per_s_2),
        thousands(VIEWERS as f64 * 1e9 / r100.egress_bits_per_s_4),
        thousands(VIEWERS as f64 * 1e10 / r100.egress_bits_per_s_4),
        answer_share
    );
    let _ = writeln!(
        md,
        "6. **Batching interval.** Bytes barely change with B until B ≥ R, where coalescing drops writes. Larger batches \
         do not save apply CPU with today's code — a viewer costs more in a large entry ({:.1} µs at 1 per entry, {:.1} µs at \
         1,024) — so B = {} ms needs {} of a core and B = {} ms {}. What they save is entries: {} /s at B = {} ms (≈ today's \
         batcher under load, above the {} fdatasync/s this disk does one after another) against {} /s at B = {} ms, for \
         {} ms more latency.",
        sweep.first().map_or(f64::NAN, |(_, t)| t.us_per_entry()),
        sweep.last().map_or(f64::NAN, |(n, t)| t.us_per_entry() / *n as f64),
        real_rows[0].batch_interval_ms,
        pct(real_rows[0].apply_sled_cores),
        real_rows[2].batch_interval_ms,
        pct(real_rows[2].apply_sled_cores),
        thousands(real_rows[0].entries_per_s),
        real_rows[0].batch_interval_ms,
        thousands(store.fdatasync_per_s),
        thousands(real_rows[2].entries_per_s),
        real_rows[2].batch_interval_ms,
        thousands(real_rows[2].latency_ms_p50 - real_rows[0].latency_ms_p50)
    );
    let _ = writeln!(
        md,
        "7. **Snapshots are counted in entries** (`snapshot_every_entries` = {}), so small batches make them frequent: at \
         B = {} ms ({} entries/s) the {} MB state is encoded every {} s ({} of a core, {} MB/s written per replica); at \
         B = {} ms every {} s ({}). The leader's expiry scan takes {} of a core at 1M viewers whatever B is.\n",
        thousands(costs.snapshot_every_entries as f64),
        real_rows[0].batch_interval_ms,
        thousands(real_rows[0].entries_per_s),
        sig(real_rows[0].snapshot_bytes / 1e6),
        sig(real_rows[0].snapshot_every_s),
        pct(real_rows[0].snapshot_cores),
        sig(real_rows[0].snapshot_bytes / real_rows[0].snapshot_every_s / 1e6),
        r100.batch_interval_ms,
        sig(r100.snapshot_every_s),
        pct(r100.snapshot_cores),
        pct(r100.expiry_scan_cores)
    );

    let _ = writeln!(
        md,
        "### How many groups for 1,000,000 viewers at R = {} s\n",
        secs(SHARDING_REPORT_INTERVAL_S)
    );
    let _ = writeln!(
        md,
        "B = {SHARDING_BATCH_INTERVAL_MS} ms, 3 voters per group, {} Gbit/s links; each node batches to every group, so each \
         group still sees {NODES} × entries per batch ÷ B entries/s while its viewers shrink to 1M ÷ G. \"At {:.0} %\" keeps \
         every resource at most {:.0} % busy (headroom for catch-up, elections and snapshots).\n",
        SHARDING_LINK_BITS_PER_S / 1e9,
        TARGET_UTILISATION * 100.0,
        TARGET_UTILISATION * 100.0
    );
    let _ = writeln!(
        md,
        "| limit | need with one group | groups (at 100 %) | groups (at {:.0} %) |",
        TARGET_UTILISATION * 100.0
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| `VIEWERS_MAX` | {} viewer states | {groups_viewers_max} | {groups_viewers_max} |",
        thousands(VIEWERS as f64)
    );
    let _ = writeln!(
        md,
        "| `SNAPSHOT_BYTES_MAX` | {} MiB | {groups_snapshot} | {} |",
        sig(snapshot_bytes_1m as f64 / (1024.0 * 1024.0)),
        (VIEWERS as f64 / (snapshot_cap_viewers * TARGET_UTILISATION)).ceil()
    );
    let fmt_groups = |g: Option<usize>| g.map_or("> 10,000".to_string(), |g| thousands(g as f64));
    let mut sharding_json = Vec::new();
    let mut needed_engineering = groups_viewers_max.max(groups_snapshot);
    let mut needed_end_to_end = 0;
    for (name, at_one, capacity, unit, full, target) in &sharding {
        let need = match *unit {
            "bit/s" => format!("{} Gbit/s", gbit(*at_one)),
            "cores" => pct(*at_one),
            _ => format!("{} updates/s", thousands(*at_one)),
        };
        let _ = writeln!(
            md,
            "| {name} | {need} | {} | {} |",
            fmt_groups(*full),
            fmt_groups(*target)
        );
        let groups = target.unwrap_or(10_001);
        if name.contains("end to end") {
            needed_end_to_end = groups;
        } else {
            needed_engineering = needed_engineering.max(groups);
        }
        sharding_json.push(json!({
            "limit": name, "need_one_group": at_one, "capacity": capacity, "unit": unit,
            "groups_at_100_percent": full, "groups_at_target": target,
        }));
    }
    let _ = writeln!(
        md,
        "\n**Estimate: {} groups** carry 1,000,000 viewers reporting every second from the measured per-update costs (the \
         largest of the rows above without the end-to-end one); with today's end-to-end store throughput it would take {}.\n",
        needed_engineering,
        thousands(needed_end_to_end as f64)
    );
    let _ = writeln!(md, "### Remedies, in the order they pay\n");
    let _ = writeln!(
        md,
        "1. **Cap the voters at 3 (or 5)** and keep the other nodes out of the group: they forward proposals and read through \
         a voter. Learners would not help: they receive the whole log too.\n\
         2. **Answer forwarded upserts with revisions, not the stored states**: the echo costs as much egress as one follower.\n\
         3. **Coarser position reports or larger batches**: writes scale with 1/R; B ≥ R coalesces each viewer to one write \
         per batch. A position only matters for a resume inside the resume window, so R = 10 s (or writing the position only \
         on pause, seek, leave and disconnect) cuts the load 5× or more against today's 2 s.\n\
         4. **Shard viewer state over several Raft groups**, keyed by room (the resume token already carries the room, so a \
         node finds the group without a lookup; very large rooms keyed by room and viewer hash): the count is above. Room \
         placement and node membership stay in one small group.\n\
         5. Cheaper per-update work: apply dominates (the state machine is in memory and snapshots are encoded off the \
         apply path since data directory format 2); a hash lookup per update instead of an ordered-map search, and \
         `due_viewers`/`digest` that do not scan the whole state (an expiry index by deadline; incremental digests).\n"
    );

    let report = json!({
        "benchmark": "capacity",
        "date": date,
        "git_commit": commit,
        "run_seconds": run_s,
        "machine": {
            "cpu_model": facts.cpu_model, "cores": facts.cores, "memory_gib": facts.memory_gib,
            "load_average_at_start": load_at_start, "load_average_at_end": load_at_end,
        },
        "scenario": {
            "nodes": NODES, "viewers": VIEWERS, "report_intervals_s": report_intervals,
            "real_report_interval_s": real_report_s, "batch_intervals_ms": BATCH_INTERVALS_MS,
            "followers": FOLLOWERS, "followers_all_nodes": FOLLOWERS_ALL_NODES,
            "wire_bytes_per_payload_byte": WIRE_BYTES_PER_PAYLOAD_BYTE,
            "grpc_call_headers_bytes_estimate": GRPC_CALL_HEADERS_BYTES,
            "trace_context_bytes_estimate": TRACE_CONTEXT_BYTES,
        },
        "sizes": {
            "viewer_in_entry_bytes": typical_in_entry, "viewer_record_bytes": typical_record,
            "viewer_with_choices_in_entry_bytes": chosen_in_entry, "viewer_with_choices_record_bytes": chosen_record,
            "marginal_viewer_bytes_in_entry": marginal_viewer_bytes,
            "heartbeat_entry_bytes": heartbeat_entry, "delete_viewer_entry_bytes": delete_entry,
            "raft_entry_framing_bytes": entry_framing_bytes, "msg_append_header_bytes": message_header_bytes,
            "raft_batch_bytes": raft_batch_bytes, "per_entry_call_overhead_bytes": per_entry_raft_overhead,
            "node_batches": size_rows,
        },
        "apply": {
            "insert": insert, "update_passes": update_passes, "best_update": best_update,
            "viewers_max_refusal": refusal,
            "sweep": sweep.iter().map(|(n, t)| json!({"viewers_per_entry": n, "timing": t})).collect::<Vec<_>>(),
            "cost_curve": apply_curve,
        },
        "sled": sled, "sled_cost_curve": sled_curve,
        "whole_state": whole,
        "store": store,
        "costs": costs,
        "rows": rows,
        "limits_at_real_cadence": limit_json,
        "sharding": {
            "report_interval_s": SHARDING_REPORT_INTERVAL_S, "batch_interval_ms": SHARDING_BATCH_INTERVAL_MS,
            "link_bits_per_s": SHARDING_LINK_BITS_PER_S, "target_utilisation": TARGET_UTILISATION,
            "groups_viewers_max": groups_viewers_max, "groups_snapshot": groups_snapshot,
            "limits": sharding_json, "groups_needed": needed_engineering, "groups_needed_end_to_end": needed_end_to_end,
        },
    });
    match common::write_results(&args.results_dir, "capacity", &stamp, &md, &report) {
        Ok(path) => {
            println!("\n{md}");
            println!(
                "capacity: results written to {} and capacity-latest.{{md,json}} ({run_s:.0} s)",
                path.display()
            );
        }
        Err(e) => {
            eprintln!("cannot write the results to {}: {e}", args.results_dir.display());
            std::process::exit(1);
        }
    }
}
