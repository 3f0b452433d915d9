//! The store: the async handle the edge calls, and the tasks that do the IO around the sans-IO
//! [`ReplicaCore`]: the replica task ([`task`]: ticks, messages, operations, one flush per
//! turn, snapshot encoding off the apply path), the cluster gRPC server, the viewer-update
//! batcher and the lifecycle task (join, registration, heartbeats).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mediamesh_proto::cluster::v1 as pb;
use parking_lot::{Mutex, RwLock};
use raft::eraftpb::{ConfChangeType, ConfChangeV2, Message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, ENTRY_BYTES_MAX};
use crate::command::{COMMANDS_PER_ENTRY_MAX, Command, Outcome};
use crate::driver::{ReplicaConfig, conf_change};
use crate::error::StoreError;
use crate::ids::{NodeId, RoomId, ViewerId, raft_id_for, validate_id};
use crate::metrics::StoreMetrics;
use crate::replica::{CoreConfig, CoreFaults, ForwardResult, OpId, OpKind, OpResult, ReplicaCore};
use crate::state_machine::StateMachine;
use crate::storage::Disk;
use crate::transport::{
    self, FaultInjector, PeerBook, PeerClient, RaftSender, SecretCheck, SecretInterceptor, TransportMetrics,
};
use crate::types::{
    ClusterSettings, ClusterStatus, Consistency, NodeLoad, NodeRegistration, NodeStatus, Placement, TurnSecrets,
    UsageRecord, ViewerState,
};

/// Inputs waiting for the replica task, at most.
pub const REPLICA_INPUTS_MAX: usize = 4096;
/// Viewer updates waiting for the batcher, at most.
pub const VIEWER_UPDATES_MAX: usize = 16_384;
/// Bytes of applied log after which a snapshot is taken even before
/// [`StoreConfig::snapshot_every_entries`], so a restart replays at most about this much.
pub const SNAPSHOT_EVERY_BYTES: u64 = 64 * 1024 * 1024;

mod batcher;
mod membership;
mod task;

pub use batcher::VIEWER_BATCHES_IN_FLIGHT_MAX;

/// Configuration of one store replica. Filled at the edge; see [`StoreConfig::new`] for the
/// defaults.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Public node id (hostname by default at the edge).
    pub node_id: String,
    /// Region of this node.
    pub region: String,
    /// sled data directory.
    pub data_dir: PathBuf,
    /// Cluster address other nodes dial (`host:port`); empty: the listener's local address.
    pub advertise_cluster: String,
    /// HTTP URL clients use for this node.
    pub http_url: String,
    /// Public gRPC URL of this node.
    pub grpc_url: String,
    /// IP of this node's media sockets (empty: not announced).
    pub media_ip: String,
    /// This node's media UDP port range (`(0, 0)`: not announced).
    pub media_ports: (u16, u16),
    /// This node's TURN relay `host:port` (empty: none).
    pub turn_addr: String,
    /// Cluster addresses of existing members to join; empty: bootstrap a new cluster (when the
    /// data directory is empty).
    pub join: Vec<String>,
    /// Shared cluster secret, checked on every cluster call.
    pub cluster_secret: String,
    /// Capacity announced in the registration.
    pub capacity: u32,
    /// Raft tick.
    pub tick_ms: u64,
    /// Ticks before an election (randomized in `[n, 2n)`).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Viewer TTL written into the cluster settings when a cluster is created.
    pub viewer_ttl_ms: u64,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_every_entries: u64,
    /// Deadline of a write or linearizable read.
    pub request_timeout_ms: u64,
    /// Period of this node's automatic heartbeat (0: only explicit [`Store::heartbeat`] calls).
    pub heartbeat_interval_ms: u64,
    /// A node with no heartbeat for this long is reported dead.
    pub node_dead_after_ms: u64,
    /// How long the viewer batcher lingers to coalesce updates while earlier batches are still in
    /// flight (an update that finds none in flight is proposed at once).
    pub viewer_batch_ms: u64,
    /// Most expiry batches the leader proposes per second.
    pub expiry_batches_per_second: u32,
}

impl StoreConfig {
    /// A configuration with the library defaults: 100 ms ticks, elections after 10 ticks,
    /// heartbeats every 2, viewer TTL 300 s, snapshot every 10 000 entries, 5 s deadlines.
    pub fn new(node_id: impl Into<String>, data_dir: impl Into<PathBuf>, cluster_secret: impl Into<String>) -> Self {
        StoreConfig {
            node_id: node_id.into(),
            region: "seoul".into(),
            data_dir: data_dir.into(),
            advertise_cluster: String::new(),
            http_url: String::new(),
            grpc_url: String::new(),
            media_ip: String::new(),
            media_ports: (0, 0),
            turn_addr: String::new(),
            join: Vec::new(),
            cluster_secret: cluster_secret.into(),
            capacity: 1000,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            viewer_ttl_ms: crate::state_machine::DEFAULT_VIEWER_TTL_MS,
            snapshot_every_entries: 10_000,
            request_timeout_ms: 5_000,
            heartbeat_interval_ms: 1_000,
            node_dead_after_ms: 5_000,
            viewer_batch_ms: 5,
            expiry_batches_per_second: 10,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        validate_id("node_id", &self.node_id).map_err(StoreError::Config)?;
        validate_id("region", &self.region).map_err(StoreError::Config)?;
        if self.cluster_secret.is_empty() {
            return Err(StoreError::Config("cluster_secret is empty".into()));
        }
        if self.tick_ms == 0 || self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(StoreError::Config(
                "need tick_ms > 0 and election_ticks > heartbeat_ticks > 0".into(),
            ));
        }
        if self.viewer_ttl_ms == 0 || self.snapshot_every_entries == 0 || self.request_timeout_ms == 0 {
            return Err(StoreError::Config(
                "viewer_ttl_ms, snapshot_every_entries, request_timeout_ms must be positive".into(),
            ));
        }
        if self.expiry_batches_per_second == 0 {
            return Err(StoreError::Config("expiry_batches_per_second must be positive".into()));
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Raft state published by the replica task after every turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct View {
    leader: u64,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    role: &'static str,
    voters: Vec<u64>,
    learners: Vec<u64>,
    snapshot_index: u64,
}

/// What the replica task takes in.
enum Input {
    Raft(Vec<Message>),
    /// An operation of this node's callers.
    Submit {
        op: OpId,
        kind: OpKind,
        deadline: Instant,
        retry: bool,
        reply: oneshot::Sender<OpResult>,
        /// The caller's span: the commit span is its child.
        span: tracing::Span,
    },
    /// A follower's proposal, forwarded here (the `Propose` RPC).
    Forwarded {
        commands: Vec<Command>,
        reply: oneshot::Sender<ForwardResult>,
        span: tracing::Span,
    },
    /// The leader's answer to one of our forwarded operations.
    ForwardReply {
        op: OpId,
        result: ForwardResult,
    },
    Compact {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    TransferLeader {
        to: u64,
    },
}

type ViewerReply = oneshot::Sender<Result<ViewerState, StoreError>>;

struct ViewerUpdate {
    state: ViewerState,
    reply: ViewerReply,
}

struct Shared {
    config: StoreConfig,
    node_id: NodeId,
    raft_id: u64,
    advertise_cluster: String,
    /// The applied state, shared with the replica core (which writes it).
    sm: Arc<RwLock<StateMachine>>,
    view: watch::Sender<View>,
    next_op: AtomicU64,
    inputs: mpsc::Sender<Input>,
    viewer_updates: mpsc::Sender<ViewerUpdate>,
    peers: Arc<PeerBook>,
    secret: SecretInterceptor,
    faults: Arc<FaultInjector>,
    metrics: Arc<TransportMetrics>,
    store_metrics: StoreMetrics,
    clients: Mutex<HashMap<String, PeerClient>>,
    last_load: Mutex<NodeLoad>,
    shutdown: CancellationToken,
    closed: watch::Receiver<bool>,
}

/// Handle to the replicated store of this node. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node_id", &self.shared.node_id)
            .field("raft_id", &self.shared.raft_id)
            .finish()
    }
}

struct SlogToTracing;

impl slog::Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", record.msg()),
            _ => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

impl Store {
    /// Opens the data directory, starts the replica, and joins or bootstraps the cluster in the
    /// background (await [`Store::wait_ready`]) until `shutdown` resolves. The caller serves
    /// [`crate::server::service`] on the cluster port (`config.advertise_cluster`, which must be
    /// set); [`crate::server::start`] does both.
    /// A corrupt data directory is an error naming the bad record.
    pub async fn open(
        config: StoreConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Store, StoreError> {
        config.validate()?;
        let node_id = NodeId::new(config.node_id.clone());
        let raft_id = raft_id_for(&node_id);
        if config.advertise_cluster.is_empty() {
            return Err(StoreError::Config("advertise_cluster is empty".into()));
        }
        let advertise_cluster = config.advertise_cluster.clone();
        let secret = SecretInterceptor::new(&config.cluster_secret).map_err(StoreError::Config)?;
        let dir = config.data_dir.clone();
        let (disk, storage, mut sm) = tokio::task::spawn_blocking(move || Disk::open(&dir))
            .await
            .map_err(|e| StoreError::Storage(format!("open task: {e}")))??;
        let fresh = storage.is_empty();
        if fresh && config.join.is_empty() {
            disk.bootstrap(&storage, raft_id, &mut sm)?;
            disk.flush().await?;
            tracing::info!(node = %node_id, raft_id, "bootstrapped a new cluster");
        }
        let logger = slog::Logger::root(SlogToTracing, slog::o!());
        let seed: u64 = rand::random();
        let core_config = CoreConfig {
            replica: ReplicaConfig::new(raft_id, config.election_ticks, config.heartbeat_ticks),
            election_ticks_max: None,
            tick_ms: config.tick_ms,
            request_timeout_ms: config.request_timeout_ms,
            snapshot_every_entries: config.snapshot_every_entries,
            snapshot_every_bytes: SNAPSHOT_EVERY_BYTES,
            expiry_batches_per_second: config.expiry_batches_per_second,
            viewer_ttl_ms: config.viewer_ttl_ms,
            // Random, so a restarted node never takes an entry of its previous life for one of
            // its batches, nor a read answer for one of its reads.
            first_batch_id: seed >> 1,
            read_context_prefix: rand::random(),
            observe: false,
            faults: CoreFaults::default(),
        };
        let peers = Arc::new(PeerBook::default());
        for node in sm.nodes().values() {
            peers.set(node.raft_id, &node.registration.cluster_addr);
        }
        let mut core = ReplicaCore::new(core_config, storage, sm, &logger)
            .map_err(|e| StoreError::Storage(format!("raft init: {e}")))?;
        if fresh && config.join.is_empty() {
            // A single new voter need not wait an election timeout.
            core.campaign();
        }

        peers.set(raft_id, &advertise_cluster);
        let metrics = Arc::new(TransportMetrics::default());
        let faults = Arc::new(FaultInjector::default());
        let token = CancellationToken::new();
        let (inputs_tx, inputs_rx) = mpsc::channel(REPLICA_INPUTS_MAX);
        let (viewer_tx, viewer_rx) = mpsc::channel(VIEWER_UPDATES_MAX);
        let (reports_tx, reports_rx) = mpsc::channel(PEER_REPORTS_MAX);
        let (view_tx, _) = watch::channel(View::default());
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            node_id,
            raft_id,
            advertise_cluster: advertise_cluster.clone(),
            sm: core.state().clone(),
            view: view_tx,
            next_op: AtomicU64::new(1),
            inputs: inputs_tx,
            viewer_updates: viewer_tx,
            peers: peers.clone(),
            secret: secret.clone(),
            faults: faults.clone(),
            metrics: metrics.clone(),
            store_metrics: StoreMetrics::default(),
            clients: Mutex::new(HashMap::new()),
            last_load: Mutex::new(NodeLoad::default()),
            shutdown: token.clone(),
            closed: closed_rx,
            config,
        });
        let store = Store { shared: shared.clone() };

        let sender = RaftSender::new(
            raft_id,
            advertise_cluster,
            secret,
            peers,
            faults,
            metrics.clone(),
            reports_tx,
            token.clone(),
        );
        let task = task::ReplicaTask::new(shared.clone(), core, disk, sender);
        let replica_token = token.clone();
        tokio::spawn(async move {
            task.run(inputs_rx, reports_rx, replica_token).await;
            // The task has dropped the database: a restart in this process may reopen it.
            let _ = closed_tx.send(true);
        });

        let batcher = store.clone();
        tokio::spawn(async move { batcher.run_viewer_batcher(viewer_rx).await });
        let lifecycle = store.clone();
        tokio::spawn(async move {
            let token = lifecycle.shared.shutdown.clone();
            tokio::select! {
                _ = token.cancelled() => {}
                _ = lifecycle.run_lifecycle(fresh) => {}
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => token.cancel(),
                _ = token.cancelled() => {}
            }
        });
        Ok(store)
    }

    /// The shutdown of this store (the cluster server stops with it).
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// The cluster secret and the transport counters the service's secret check uses.
    pub(crate) fn secret_check(&self) -> SecretCheck {
        SecretCheck::new(&self.shared.config.cluster_secret, self.shared.metrics.clone())
    }

    /// This node's public id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.node_id
    }

    /// This node's raft id (see [`crate::ids`]).
    pub fn raft_id(&self) -> u64 {
        self.shared.raft_id
    }

    /// The cluster address this node advertises.
    pub fn advertise_cluster(&self) -> &str {
        &self.shared.advertise_cluster
    }

    /// Transport counters.
    pub fn transport_metrics(&self) -> &TransportMetrics {
        &self.shared.metrics
    }

    /// Raft instruments (commit latency, leadership), for the node's registry.
    pub fn store_metrics(&self) -> &StoreMetrics {
        &self.shared.store_metrics
    }

    /// Test-only network faults on this node's outgoing calls.
    #[cfg(feature = "fault-injection")]
    pub fn fault_injector(&self) -> Arc<FaultInjector> {
        self.shared.faults.clone()
    }

    /// Stops the store (as the shutdown future does).
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Resolves once the replica task has stopped and released the data directory.
    pub async fn closed(&self) {
        let mut closed = self.shared.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.shared.config.request_timeout_ms)
    }

    /// True when a leader is known and this node is registered (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        let leader = self.shared.view.borrow().leader;
        leader != 0 && self.shared.sm.read().nodes().contains_key(&self.shared.node_id)
    }

    /// Waits until [`Store::is_ready`] (callers bound it with a timeout).
    pub async fn wait_ready(&self) -> Result<(), StoreError> {
        let mut view = self.shared.view.subscribe();
        loop {
            if self.is_ready() {
                return Ok(());
            }
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return Err(StoreError::Shutdown) },
                _ = self.shared.shutdown.cancelled() => return Err(StoreError::Shutdown),
            }
        }
    }

    // ----- writes -----

    /// Runs one operation through the replica core and waits for its result (or `deadline`).
    async fn run_op(&self, kind: OpKind, deadline: Instant, retry: bool) -> Result<Vec<Outcome>, StoreError> {
        let timeout_ms = self.shared.config.request_timeout_ms;
        let op = self.shared.next_op.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.shared
            .inputs
            .try_send(Input::Submit {
                op,
                kind,
                deadline,
                retry,
                reply,
                span: tracing::Span::current(),
            })
            .map_err(|_| StoreError::Overloaded("replica input queue"))?;
        tokio::select! {
            result = rx => match result {
                Err(_) => Err(StoreError::Shutdown),
                Ok(result) => result.map_err(|e| e.into_store_error(timeout_ms)),
            },
            // The core answers at its deadline too; this bounds a stalled task.
            _ = tokio::time::sleep_until(deadline + Duration::from_millis(self.shared.config.tick_ms * 2)) => {
                Err(StoreError::Timeout(timeout_ms))
            }
            _ = self.shared.shutdown.cancelled() => Err(StoreError::Shutdown),
        }
    }

    /// Proposes commands (forwarding to the leader when this node is a follower) and returns one
    /// outcome per command once applied. The core retries only where the command certainly was
    /// not proposed (no leader yet, or the target said it is not the leader).
    #[tracing::instrument(name = "store.propose", skip_all, fields(commands = commands.len() as i64))]
    pub(crate) async fn propose(&self, commands: Vec<Command>, deadline: Instant) -> Result<Vec<Outcome>, StoreError> {
        if commands.is_empty() || commands.len() > COMMANDS_PER_ENTRY_MAX {
            return Err(StoreError::InvalidInput(format!(
                "1..={COMMANDS_PER_ENTRY_MAX} commands per proposal"
            )));
        }
        let size = codec::encoded_len(&commands);
        if size > ENTRY_BYTES_MAX - 64 {
            return Err(StoreError::InvalidInput(format!(
                "proposal of {size} bytes is too large"
            )));
        }
        self.run_op(OpKind::Propose(commands), deadline, true).await
    }

    fn client_for(&self, addr: &str) -> Result<PeerClient, StoreError> {
        let mut clients = self.shared.clients.lock();
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let client = transport::peer_client(addr, &self.shared.secret).map_err(StoreError::Transport)?;
        if clients.len() >= PEER_CLIENTS_MAX {
            clients.clear();
        }
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// A client for the node with `raft_id`; `Err(None)` when nothing can be sent to it (the
    /// fault injector blocks it, or its address is unknown), so a caller may try again.
    fn client_for_raft_id(&self, raft_id: u64) -> Result<PeerClient, Option<StoreError>> {
        if self.shared.faults.is_blocked(raft_id) {
            return Err(None);
        }
        let addr = self.shared.peers.get(raft_id).ok_or(None)?;
        self.client_for(&addr).map_err(Some)
    }

    /// Leader side of a forwarded proposal (the `Propose` RPC).
    pub(crate) async fn handle_forwarded(&self, body: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        let forwarded =
            task::decode_forwarded(body).map_err(|e| tonic::Status::invalid_argument(format!("commands: {e}")))?;
        let commands = forwarded.commands;
        if commands.is_empty() || commands.len() > COMMANDS_PER_ENTRY_MAX {
            return Err(tonic::Status::invalid_argument("bad number of commands"));
        }
        if self.shared.view.borrow().leader != self.shared.raft_id {
            return Err(tonic::Status::failed_precondition(NOT_LEADER));
        }
        let (reply, rx) = oneshot::channel();
        self.shared
            .inputs
            .try_send(Input::Forwarded {
                commands,
                reply,
                span: tracing::Span::current(),
            })
            .map_err(|_| tonic::Status::resource_exhausted("replica input queue is full"))?;
        let result = tokio::time::timeout_at(self.deadline(), rx)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("timed out"))?
            .map_err(|_| tonic::Status::unavailable("store is shut down"))?;
        task::encode_forward_result(result)
    }

    async fn propose_one(&self, command: Command) -> Result<Outcome, StoreError> {
        let mut outcomes = self.propose(vec![command], self.deadline()).await?;
        // propose returns exactly one outcome per command.
        Ok(outcomes.pop().expect("one outcome per command"))
    }

    /// Places `room` on `node` if its epoch is still `expected_epoch` (None: not placed yet).
    /// Returns the new placement (epoch + 1), or [`StoreError::EpochConflict`] with the current one.
    pub async fn place_room_cas(
        &self,
        room: RoomId,
        expected_epoch: Option<u64>,
        node: NodeId,
    ) -> Result<Placement, StoreError> {
        room.validate()
            .and_then(|_| node.validate())
            .map_err(StoreError::InvalidInput)?;
        match self
            .propose_one(Command::PlaceRoom {
                room,
                expected_epoch,
                node,
            })
            .await?
        {
            Outcome::Placed(p) => Ok(p),
            other => Err(outcome_error(other)),
        }
    }

    /// Removes a room's placement if its epoch is still `expected_epoch`.
    pub async fn delete_room(&self, room: RoomId, expected_epoch: u64) -> Result<(), StoreError> {
        room.validate().map_err(StoreError::InvalidInput)?;
        match self.propose_one(Command::DeleteRoom { room, expected_epoch }).await? {
            Outcome::Deleted(_) => Ok(()),
            other => Err(outcome_error(other)),
        }
    }

    /// Writes a viewer state through this node's batcher (updates to the same viewer coalesce,
    /// last write wins) and returns the stored state after commit (with `updated_at_ms` set to
    /// now, `expires_at_ms` and `revision` set by the state machine).
    pub async fn upsert_viewer(&self, mut state: ViewerState) -> Result<ViewerState, StoreError> {
        state.updated_at_ms = now_ms();
        state.validate().map_err(StoreError::InvalidInput)?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .viewer_updates
            .try_send(ViewerUpdate { state, reply })
            .map_err(|_| StoreError::Overloaded("viewer update queue"))?;
        match tokio::time::timeout_at(self.deadline(), rx).await {
            Err(_) => Err(StoreError::Timeout(self.shared.config.request_timeout_ms)),
            Ok(Err(_)) => Err(StoreError::Shutdown),
            Ok(Ok(result)) => result,
        }
    }

    /// Deletes a viewer state; true if it existed.
    pub async fn delete_viewer(&self, viewer: ViewerId) -> Result<bool, StoreError> {
        viewer.validate().map_err(StoreError::InvalidInput)?;
        match self.propose_one(Command::DeleteViewer { viewer }).await? {
            Outcome::Deleted(existed) => Ok(existed),
            other => Err(outcome_error(other)),
        }
    }

    /// Registers (or updates) a node. This node registers itself on start; call this to change
    /// what it announces (capacity, addresses).
    pub async fn register_node(&self, registration: NodeRegistration) -> Result<(), StoreError> {
        registration.validate().map_err(StoreError::InvalidInput)?;
        match self.propose_one(Command::RegisterNode(registration)).await? {
            Outcome::Node(_) => Ok(()),
            other => Err(outcome_error(other)),
        }
    }

    /// Reports this node's load now; the automatic heartbeat repeats the last load given.
    pub async fn heartbeat(&self, load: NodeLoad) -> Result<(), StoreError> {
        *self.shared.last_load.lock() = load.clone();
        let command = Command::Heartbeat {
            node: self.shared.node_id.clone(),
            load,
            at_ms: now_ms(),
        };
        match self.propose_one(command).await? {
            Outcome::Node(_) => Ok(()),
            other => Err(outcome_error(other)),
        }
    }

    /// Marks a node as draining (it takes no new work) or not.
    pub async fn set_node_draining(&self, node: NodeId, draining: bool) -> Result<(), StoreError> {
        match self.propose_one(Command::SetNodeDraining { node, draining }).await? {
            Outcome::Node(_) => Ok(()),
            other => Err(outcome_error(other)),
        }
    }

    /// Removes a node from the raft membership and the node table. Forwarded to the leader; a
    /// leader asked to remove itself hands leadership to another voter first.
    pub async fn remove_node(&self, node: NodeId) -> Result<(), StoreError> {
        node.validate().map_err(StoreError::InvalidInput)?;
        let deadline = self.deadline();
        let mut view = self.shared.view.subscribe();
        loop {
            let current = view.borrow_and_update().clone();
            let target = raft_id_for(&node);
            if current.leader == self.shared.raft_id {
                if target == self.shared.raft_id {
                    if let Some(&other) = current.voters.iter().find(|v| **v != target) {
                        let _ = self.shared.inputs.try_send(Input::TransferLeader { to: other });
                    } else {
                        return Err(StoreError::Rejected("cannot remove the only voter".into()));
                    }
                } else {
                    if current.voters.contains(&target) || current.learners.contains(&target) {
                        self.conf_change(conf_change(ConfChangeType::RemoveNode, target), deadline)
                            .await?;
                    }
                    self.propose(vec![Command::RemoveNode { node }], deadline).await?;
                    return Ok(());
                }
            } else if current.leader != 0 {
                match self.client_for_raft_id(current.leader) {
                    Ok(mut client) => {
                        let mut request = tonic::Request::new(pb::RemoveRequest {
                            node_id: node.0.clone(),
                        });
                        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
                        match client.remove(request).await {
                            Ok(_) => return Ok(()),
                            Err(status) if not_sent_or_not_leader(&status) => {}
                            Err(status) => return Err(forward_error(status, self.shared.config.request_timeout_ms)),
                        }
                    }
                    Err(None) => {}
                    Err(Some(e)) => return Err(e),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(StoreError::Timeout(self.shared.config.request_timeout_ms)),
                _ = view.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Leader side of the `Remove` RPC.
    pub(crate) async fn handle_remove(&self, node: NodeId) -> Result<(), tonic::Status> {
        if self.shared.view.borrow().leader != self.shared.raft_id {
            return Err(tonic::Status::failed_precondition(NOT_LEADER));
        }
        self.remove_node(node).await.map_err(status_from_error)
    }

    async fn conf_change(&self, cc: ConfChangeV2, deadline: Instant) -> Result<(), StoreError> {
        loop {
            match self.run_op(OpKind::ConfChange(cc.clone()), deadline, false).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Overloaded("membership change")) if Instant::now() < deadline => {
                    // A membership change is pending: one at a time.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Rotates the TURN secret; the current one is kept as `previous`.
    pub async fn rotate_turn_secret(&self, secret: String) -> Result<TurnSecrets, StoreError> {
        match self
            .propose_one(Command::RotateTurnSecret {
                secret,
                at_ms: now_ms(),
            })
            .await?
        {
            Outcome::Turn(t) => Ok(t),
            other => Err(outcome_error(other)),
        }
    }

    /// Replaces the cluster settings.
    pub async fn set_settings(&self, settings: ClusterSettings) -> Result<(), StoreError> {
        match self
            .propose_one(Command::SetSettings {
                settings,
                only_if_unset: false,
            })
            .await?
        {
            Outcome::Done => Ok(()),
            other => Err(outcome_error(other)),
        }
    }

    /// Adds viewer time to the usage ledger and drops the days before `keep_from_day`, once per
    /// `(run, seq)` of this node: an add sent again with the same numbers after an error (it may
    /// have committed) is not counted twice, and an add at or before one already applied is
    /// ignored. `run` is the process's start, `seq` rises with every new add. Records are sent
    /// in commands of at most [`crate::command::USAGE_PER_ADD_MAX`], all in one entry.
    pub async fn add_usage(
        &self,
        run: u64,
        seq: u64,
        records: &[UsageRecord],
        keep_from_day: &str,
    ) -> Result<(), StoreError> {
        if let Some(error) = records
            .iter()
            .find_map(|r| r.validate().err())
            .or_else(|| crate::types::validate_day(keep_from_day).err())
        {
            return Err(StoreError::InvalidInput(error));
        }
        let mut chunks: Vec<Vec<UsageRecord>> = records
            .chunks(crate::command::USAGE_PER_ADD_MAX)
            .map(<[UsageRecord]>::to_vec)
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let commands = (0u32..)
            .zip(chunks)
            .map(|(part, records)| Command::AddUsage {
                node: self.node_id().clone(),
                batch: crate::types::UsageBatch { run, seq, part },
                records,
                keep_from_day: keep_from_day.to_string(),
            })
            .collect();
        for outcome in self.propose(commands, self.deadline()).await? {
            if outcome != Outcome::Done {
                return Err(outcome_error(outcome));
            }
        }
        Ok(())
    }

    /// The usage ledger's records of `day` (`YYYY-MM-DD`), by room.
    pub async fn usage(&self, day: &str, consistency: Consistency) -> Result<Vec<UsageRecord>, StoreError> {
        crate::types::validate_day(day).map_err(StoreError::InvalidInput)?;
        self.read_barrier(consistency).await?;
        Ok(self.shared.sm.read().usage_of_day(day).cloned().collect())
    }

    /// Takes a snapshot of the applied state now and compacts the log up to it; returns the
    /// snapshot index. (Normally automatic every `snapshot_every_entries`.)
    pub async fn compact_now(&self) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .inputs
            .try_send(Input::Compact { reply })
            .map_err(|_| StoreError::Overloaded("replica input queue"))?;
        rx.await.map_err(|_| StoreError::Shutdown)?
    }

    // ----- reads -----

    /// Waits until this replica may serve a read of the given consistency.
    async fn read_barrier(&self, consistency: Consistency) -> Result<(), StoreError> {
        if consistency == Consistency::Local {
            return Ok(());
        }
        self.run_op(OpKind::Read, self.deadline(), true).await.map(|_| ())
    }

    /// A room's placement.
    pub async fn room(&self, room: &RoomId, consistency: Consistency) -> Result<Option<Placement>, StoreError> {
        self.read_barrier(consistency).await?;
        Ok(self.shared.sm.read().rooms().get(room).cloned())
    }

    /// All placements, by room id.
    pub async fn rooms(&self, consistency: Consistency) -> Result<Vec<Placement>, StoreError> {
        self.read_barrier(consistency).await?;
        let mut rooms: Vec<Placement> = self.shared.sm.read().rooms().values().cloned().collect();
        rooms.sort_unstable_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    /// A viewer's state.
    pub async fn viewer(&self, viewer: &ViewerId, consistency: Consistency) -> Result<Option<ViewerState>, StoreError> {
        self.read_barrier(consistency).await?;
        Ok(self.shared.sm.read().viewers().get(viewer).cloned())
    }

    /// All viewer states (at most the state machine's limit), by viewer id.
    pub async fn viewers(&self, consistency: Consistency) -> Result<Vec<ViewerState>, StoreError> {
        self.read_barrier(consistency).await?;
        let mut viewers: Vec<ViewerState> = self.shared.sm.read().viewers().values().cloned().collect();
        viewers.sort_unstable_by(|a, b| a.viewer.cmp(&b.viewer));
        Ok(viewers)
    }

    /// Current and previous TURN secrets.
    pub async fn turn_secrets(&self, consistency: Consistency) -> Result<Option<TurnSecrets>, StoreError> {
        self.read_barrier(consistency).await?;
        Ok(self.shared.sm.read().turn().cloned())
    }

    /// Cluster settings (None until the first leader wrote them).
    pub async fn settings(&self, consistency: Consistency) -> Result<Option<ClusterSettings>, StoreError> {
        self.read_barrier(consistency).await?;
        Ok(self.shared.sm.read().settings().cloned())
    }

    /// This replica's view of the cluster (a local read: it never blocks on the network).
    pub fn status(&self) -> ClusterStatus {
        self.status_with(true)
    }

    /// [`Self::status`], with the state digest only when `digest` (it hashes the whole state:
    /// about 0.6 s at 500,000 viewers; its field is empty without it).
    pub fn status_with(&self, digest: bool) -> ClusterStatus {
        let view = self.shared.view.borrow().clone();
        let sm = self.shared.sm.read();
        let nodes = Self::node_statuses(&sm, &view, self.shared.config.node_dead_after_ms);
        ClusterStatus {
            node_id: self.shared.node_id.clone(),
            raft_id: self.shared.raft_id,
            leader: sm.node_by_raft_id(view.leader).map(|n| n.registration.id.clone()),
            leader_raft_id: view.leader,
            term: view.term,
            commit_index: view.commit_index,
            applied_index: sm.applied().index,
            snapshot_index: view.snapshot_index,
            role: view.role.to_string(),
            nodes,
            digest: if digest { sm.digest() } else { String::new() },
            rooms: sm.rooms().len() as u64,
            viewers: sm.viewers().len() as u64,
        }
    }

    /// This replica's view of the registered nodes (a local read, and cheap: no state digest).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let view = self.shared.view.borrow().clone();
        Self::node_statuses(&self.shared.sm.read(), &view, self.shared.config.node_dead_after_ms)
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        let leader = self.shared.view.borrow().leader;
        self.shared
            .sm
            .read()
            .node_by_raft_id(leader)
            .map(|n| n.registration.id.clone())
    }

    fn node_statuses(sm: &StateMachine, view: &View, dead_after: u64) -> Vec<NodeStatus> {
        sm.node_statuses(&view.voters, &view.learners, now_ms(), dead_after)
    }

    /// The `Status` RPC answer.
    pub(crate) fn status_proto(&self) -> pb::StatusResponse {
        let view = self.shared.view.borrow().clone();
        pb::StatusResponse {
            node_id: self.shared.node_id.0.clone(),
            raft_id: self.shared.raft_id,
            leader_raft_id: view.leader,
            term: view.term,
            commit_index: view.commit_index,
            applied_index: view.applied_index,
        }
    }
}

/// Peer delivery reports waiting for the replica task, at most.
const PEER_REPORTS_MAX: usize = 1024;
/// Clients to distinct addresses kept for forwarding, at most.
const PEER_CLIENTS_MAX: usize = 256;
const NOT_LEADER: &str = "not the leader";
/// Set on a `Join` forwarded by a follower, so it is forwarded at most once.
pub(crate) const FORWARDED_METADATA_KEY: &str = "x-mediamesh-forwarded";

/// True when a call to the leader we knew may be tried again: it said it is not the leader,
/// or the leader is gone (crashed, restarting) and nothing was sent.
fn not_sent_or_not_leader(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition || connection_refused(status)
}

/// A failed forwarded proposal as the replica core takes it.
fn forward_failure(status: tonic::Status, timeout_ms: u64) -> ForwardResult {
    if not_sent_or_not_leader(&status) {
        ForwardResult::NotLeader
    } else {
        ForwardResult::Failed(forward_error(status, timeout_ms).to_string())
    }
}

/// True when a call failed because its TCP connection was refused: the request never left this
/// node, so retrying it cannot apply it twice. (A reset or timeout after connecting is not this:
/// the peer may have received the request.)
fn connection_refused(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn forward_error(status: tonic::Status, timeout_ms: u64) -> StoreError {
    match status.code() {
        tonic::Code::Unauthenticated => StoreError::Unauthenticated,
        tonic::Code::DeadlineExceeded => StoreError::Timeout(timeout_ms),
        tonic::Code::InvalidArgument => StoreError::InvalidInput(status.message().to_string()),
        _ => StoreError::Transport(format!("{}: {}", status.code(), status.message())),
    }
}

fn status_from_error(e: StoreError) -> tonic::Status {
    match e {
        StoreError::InvalidInput(m) => tonic::Status::invalid_argument(m),
        StoreError::Rejected(m) => tonic::Status::failed_precondition(format!("rejected: {m}")),
        StoreError::NoLeader => tonic::Status::unavailable("no leader"),
        StoreError::Timeout(_) => tonic::Status::deadline_exceeded(e.to_string()),
        StoreError::Overloaded(_) => tonic::Status::resource_exhausted(e.to_string()),
        other => tonic::Status::internal(other.to_string()),
    }
}

fn outcome_error(outcome: Outcome) -> StoreError {
    match outcome {
        Outcome::EpochConflict(current) => StoreError::EpochConflict { current },
        Outcome::Rejected(reason) => StoreError::Rejected(reason),
        other => StoreError::Rejected(format!("unexpected outcome {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_forward_is_retried_and_other_failures_are_not() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port(); // the listener is dropped here: connections to the port are refused
        let secret = SecretInterceptor::new("secret").expect("a valid secret");
        let mut client = transport::peer_client(&format!("127.0.0.1:{port}"), &secret).expect("a client");
        let status = client
            .propose(pb::ProposeRequest { commands: Vec::new() })
            .await
            .expect_err("nothing listens there");
        assert!(connection_refused(&status), "{status:?}");
        assert_eq!(forward_failure(status, 1), ForwardResult::NotLeader);

        let unknown = tonic::Status::unavailable("connection reset after the request was sent");
        assert!(!connection_refused(&unknown));
        assert!(matches!(forward_failure(unknown, 1), ForwardResult::Failed(_)));
    }
}
