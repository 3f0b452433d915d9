//! Node-to-node transport over tonic (`mediamesh.cluster.v1.Cluster`): the server side checks
//! the cluster secret on every call and bounds every message; the client side keeps one bounded
//! send queue per peer (dropping and counting when full), reconnects with backoff, and passes
//! every outgoing call through the [`FaultInjector`] (inactive unless a test configures it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mediamesh_proto::cluster::v1 as pb;
use parking_lot::{Mutex, RwLock};
use pb::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Metadata key carrying the cluster secret.
pub const SECRET_METADATA_KEY: &str = "x-mediamesh-cluster-secret";
/// Largest gRPC message accepted or sent on the cluster port, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most raft messages in one `Raft` call.
pub const RAFT_MESSAGES_PER_BATCH_MAX: usize = 1024;
/// Messages waiting per peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 4096;
/// Longest wait to connect to a peer.
pub const CONNECT_TIMEOUT_MS: u64 = 500;
/// Longest a single call to a peer may take (snapshots included).
pub const CALL_TIMEOUT_MS: u64 = 10_000;
/// Reconnect backoff bounds.
pub const BACKOFF_MIN_MS: u64 = 20;
/// See [`BACKOFF_MIN_MS`].
pub const BACKOFF_MAX_MS: u64 = 1_000;

/// Counters of the transport (exported as metrics by the edge).
#[derive(Debug, Default)]
pub struct TransportMetrics {
    /// Raft messages dropped because a peer's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Raft messages dropped because the peer could not be reached.
    pub dropped_unreachable: AtomicU64,
    /// Raft messages dropped by the fault injector.
    pub dropped_injected: AtomicU64,
    /// Raft messages sent.
    pub sent: AtomicU64,
    /// Calls refused on our server (bad secret, malformed, oversized, overloaded).
    pub refused_calls: AtomicU64,
}

/// Test-only network faults applied to every outgoing call of one node: drop, delay, duplicate,
/// partition (by raft id). Inactive by default; seeded so a failing run can be replayed.
pub struct FaultInjector {
    active: AtomicBool,
    state: Mutex<FaultState>,
}

struct FaultState {
    rng: rand::rngs::StdRng,
    drop_probability: f64,
    duplicate_probability: f64,
    delay_ms: (u64, u64),
    blocked: HashSet<u64>,
}

/// What to do with one outgoing call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FaultDecision {
    pub drop: bool,
    pub duplicate: bool,
    pub delay_ms: u64,
}

const NO_FAULT: FaultDecision = FaultDecision {
    drop: false,
    duplicate: false,
    delay_ms: 0,
};

impl Default for FaultInjector {
    fn default() -> Self {
        FaultInjector {
            active: AtomicBool::new(false),
            state: Mutex::new(FaultState {
                rng: rand::rngs::StdRng::seed_from_u64(0),
                drop_probability: 0.0,
                duplicate_probability: 0.0,
                delay_ms: (0, 0),
                blocked: HashSet::new(),
            }),
        }
    }
}

impl FaultInjector {
    fn update(&self, f: impl FnOnce(&mut FaultState)) {
        let mut state = self.state.lock();
        f(&mut state);
        let active = state.drop_probability > 0.0
            || state.duplicate_probability > 0.0
            || state.delay_ms.1 > 0
            || !state.blocked.is_empty();
        self.active.store(active, Ordering::Release);
    }
    /// Reseeds the random decisions.
    pub fn seed(&self, seed: u64) {
        self.update(|s| s.rng = rand::rngs::StdRng::seed_from_u64(seed));
    }
    /// Drops each outgoing call with this probability.
    pub fn set_drop_probability(&self, p: f64) {
        self.update(|s| s.drop_probability = p.clamp(0.0, 1.0));
    }
    /// Sends each outgoing call twice with this probability.
    pub fn set_duplicate_probability(&self, p: f64) {
        self.update(|s| s.duplicate_probability = p.clamp(0.0, 1.0));
    }
    /// Delays each outgoing call by a uniform random time in `[min_ms, max_ms]`.
    pub fn set_delay_ms(&self, min_ms: u64, max_ms: u64) {
        self.update(|s| s.delay_ms = (min_ms.min(max_ms), max_ms));
    }
    /// Blocks all calls to these raft ids (one side of a partition).
    pub fn block(&self, raft_ids: &[u64]) {
        self.update(|s| s.blocked.extend(raft_ids.iter().copied()));
    }
    /// Removes every fault.
    pub fn heal(&self) {
        self.update(|s| {
            s.drop_probability = 0.0;
            s.duplicate_probability = 0.0;
            s.delay_ms = (0, 0);
            s.blocked.clear();
        });
    }
    /// True when calls to `raft_id` are blocked.
    pub fn is_blocked(&self, raft_id: u64) -> bool {
        self.active.load(Ordering::Acquire) && self.state.lock().blocked.contains(&raft_id)
    }
    pub(crate) fn decide(&self, raft_id: u64) -> FaultDecision {
        if !self.active.load(Ordering::Acquire) {
            return NO_FAULT;
        }
        let mut s = self.state.lock();
        if s.blocked.contains(&raft_id) {
            return FaultDecision {
                drop: true,
                duplicate: false,
                delay_ms: 0,
            };
        }
        let (drop_p, dup_p, (lo, hi)) = (s.drop_probability, s.duplicate_probability, s.delay_ms);
        let drop = drop_p > 0.0 && s.rng.random_bool(drop_p);
        let duplicate = dup_p > 0.0 && s.rng.random_bool(dup_p);
        let delay_ms = if hi > 0 { s.rng.random_range(lo..=hi) } else { 0 };
        FaultDecision {
            drop,
            duplicate,
            delay_ms,
        }
    }
}

/// Adds the cluster secret to outgoing calls.
#[derive(Clone)]
pub struct SecretInterceptor {
    secret: MetadataValue<tonic::metadata::Ascii>,
}

impl SecretInterceptor {
    /// Fails when the secret cannot travel as an ASCII metadata value.
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret
            .parse()
            .map_err(|_| "cluster secret must be printable ASCII".to_string())?;
        Ok(SecretInterceptor { secret })
    }
}

impl Interceptor for SecretInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(SECRET_METADATA_KEY, self.secret.clone());
        Ok(request)
    }
}

/// Checks the cluster secret on incoming calls, in constant time.
#[derive(Clone)]
pub struct SecretCheck {
    secret: Arc<Vec<u8>>,
    metrics: Arc<TransportMetrics>,
}

impl SecretCheck {
    /// A check against `secret`.
    pub fn new(secret: &str, metrics: Arc<TransportMetrics>) -> Self {
        SecretCheck {
            secret: Arc::new(secret.as_bytes().to_vec()),
            metrics,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for SecretCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let given = request.metadata().get(SECRET_METADATA_KEY).map(|v| v.as_bytes());
        match given {
            Some(given) if constant_time_eq(given, &self.secret) => Ok(request),
            _ => {
                self.metrics.refused_calls.fetch_add(1, Ordering::Relaxed);
                Err(tonic::Status::unauthenticated("missing or wrong cluster secret"))
            }
        }
    }
}

/// A client for one peer address, with the secret attached.
pub type PeerClient = ClusterClient<InterceptedService<Channel, SecretInterceptor>>;

/// Builds a lazily-connecting client for `addr` (`host:port`).
pub fn peer_client(addr: &str, secret: &SecretInterceptor) -> Result<PeerClient, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad peer address {addr}: {e}"))?
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .timeout(Duration::from_millis(CALL_TIMEOUT_MS))
        .tcp_nodelay(true);
    Ok(ClusterClient::with_interceptor(endpoint.connect_lazy(), secret.clone())
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX))
}

/// What a peer sender tells the replica about delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryReport {
    /// A snapshot message reached (or failed to reach) the peer.
    Snapshot { to: u64, delivered: bool },
    /// The peer could not be reached.
    Unreachable { to: u64 },
}

/// Raft id → cluster address, learned from the log, join answers and incoming calls.
#[derive(Default)]
pub struct PeerBook {
    addrs: RwLock<HashMap<u64, String>>,
}

impl PeerBook {
    /// Records (or updates) an address.
    pub fn set(&self, raft_id: u64, addr: &str) {
        if addr.is_empty() || addr.len() > crate::types::ADDRESS_BYTES_MAX {
            return;
        }
        let mut addrs = self.addrs.write();
        if addrs.get(&raft_id).map(String::as_str) != Some(addr) {
            addrs.insert(raft_id, addr.to_string());
        }
    }
    /// The address of `raft_id`.
    pub fn get(&self, raft_id: u64) -> Option<String> {
        self.addrs.read().get(&raft_id).cloned()
    }
    /// All known peers.
    pub fn all(&self) -> Vec<(u64, String)> {
        self.addrs.read().iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

/// Outgoing raft traffic: one bounded queue and sender task per peer.
pub struct RaftSender {
    self_raft_id: u64,
    self_addr: String,
    secret: SecretInterceptor,
    peers: Arc<PeerBook>,
    faults: Arc<FaultInjector>,
    metrics: Arc<TransportMetrics>,
    reports: mpsc::Sender<DeliveryReport>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl RaftSender {
    /// Creates the sender; peer tasks start on first use and stop on `shutdown`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        self_raft_id: u64,
        self_addr: String,
        secret: SecretInterceptor,
        peers: Arc<PeerBook>,
        faults: Arc<FaultInjector>,
        metrics: Arc<TransportMetrics>,
        reports: mpsc::Sender<DeliveryReport>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        RaftSender {
            self_raft_id,
            self_addr,
            secret,
            peers,
            faults,
            metrics,
            reports,
            queues: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Queues messages for their peers; drops (and counts) when a queue is full.
    pub fn send(&self, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let queue = {
                let mut queues = self.queues.lock();
                queues
                    .entry(to)
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
                        let task = PeerTask {
                            to,
                            from: self.self_raft_id,
                            from_addr: self.self_addr.clone(),
                            secret: self.secret.clone(),
                            peers: self.peers.clone(),
                            faults: self.faults.clone(),
                            metrics: self.metrics.clone(),
                            reports: self.reports.clone(),
                        };
                        let shutdown = self.shutdown.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = task.run(rx) => {}
                            }
                        });
                        tx
                    })
                    .clone()
            };
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            if queue.try_send(message).is_err() {
                self.metrics.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                if is_snapshot {
                    // Raft pauses the follower until it hears how its snapshot went: this report
                    // must arrive even when the reports queue is full (of `Unreachable`s, say),
                    // or the follower would never be sent anything again.
                    let reports = self.reports.clone();
                    tokio::spawn(async move {
                        let _ = reports.send(DeliveryReport::Snapshot { to, delivered: false }).await;
                    });
                }
            }
        }
    }
}

struct PeerTask {
    to: u64,
    from: u64,
    from_addr: String,
    secret: SecretInterceptor,
    peers: Arc<PeerBook>,
    faults: Arc<FaultInjector>,
    metrics: Arc<TransportMetrics>,
    reports: mpsc::Sender<DeliveryReport>,
}

impl PeerTask {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut client: Option<(String, PeerClient)> = None;
        let mut backoff_ms = BACKOFF_MIN_MS;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < RAFT_MESSAGES_PER_BATCH_MAX {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let snapshots: Vec<u64> = batch
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to)
                .collect();
            let count = batch.len() as u64;
            let Some(addr) = self.peers.get(self.to) else {
                self.metrics.dropped_unreachable.fetch_add(count, Ordering::Relaxed);
                self.report(&snapshots, false, true).await;
                continue;
            };
            if client.as_ref().is_none_or(|(a, _)| a != &addr) {
                match peer_client(&addr, &self.secret) {
                    Ok(c) => client = Some((addr.clone(), c)),
                    Err(e) => {
                        tracing::warn!(to = self.to, "cannot build client: {e}");
                        self.metrics.dropped_unreachable.fetch_add(count, Ordering::Relaxed);
                        self.report(&snapshots, false, true).await;
                        continue;
                    }
                }
            }
            let decision = self.faults.decide(self.to);
            if decision.drop {
                self.metrics.dropped_injected.fetch_add(count, Ordering::Relaxed);
                self.report(&snapshots, false, false).await;
                continue;
            }
            let mut encoded = Vec::with_capacity(batch.len());
            for m in &batch {
                match m.write_to_bytes() {
                    Ok(b) => encoded.push(b),
                    Err(e) => tracing::error!("cannot encode raft message: {e}"),
                }
            }
            let request = pb::RaftBatch {
                from_raft_id: self.from,
                from_addr: self.from_addr.clone(),
                messages: encoded,
            };
            // Checked just above: the client exists for this address.
            let mut c = client.as_ref().map(|(_, c)| c.clone()).expect("client set above");
            if decision.delay_ms > 0 {
                // Delayed calls travel on their own task, so later batches may overtake them
                // (reordering, as a real network does).
                let metrics = self.metrics.clone();
                let reports = self.reports.clone();
                let duplicate = decision.duplicate;
                let delay = Duration::from_millis(decision.delay_ms);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if duplicate {
                        let _ = c.raft(request.clone()).await;
                    }
                    let delivered = c.raft(request).await.is_ok();
                    if delivered {
                        metrics.sent.fetch_add(count, Ordering::Relaxed);
                    }
                    for to in snapshots {
                        let _ = reports.send(DeliveryReport::Snapshot { to, delivered }).await;
                    }
                });
                continue;
            }
            if decision.duplicate {
                let _ = c.raft(request.clone()).await;
            }
            match c.raft(request).await {
                Ok(_) => {
                    backoff_ms = BACKOFF_MIN_MS;
                    self.metrics.sent.fetch_add(count, Ordering::Relaxed);
                    self.report(&snapshots, true, false).await;
                }
                Err(status) => {
                    tracing::debug!(to = self.to, %addr, "raft send failed: {status}");
                    self.metrics.dropped_unreachable.fetch_add(count, Ordering::Relaxed);
                    self.report(&snapshots, false, true).await;
                    // Back off before the next attempt; messages queued meanwhile are bounded
                    // by the queue and stale ones are harmless to raft.
                    let jitter = rand::rng().random_range(0..=backoff_ms / 2);
                    tokio::time::sleep(Duration::from_millis(backoff_ms + jitter)).await;
                    backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
                    if status.code() == tonic::Code::Unavailable {
                        client = None;
                    }
                }
            }
        }
    }

    async fn report(&self, snapshots: &[u64], delivered: bool, unreachable: bool) {
        for &to in snapshots {
            let _ = self.reports.send(DeliveryReport::Snapshot { to, delivered }).await;
        }
        if unreachable {
            let _ = self.reports.try_send(DeliveryReport::Unreachable { to: self.to });
        }
    }
}

/// Decodes the raft messages of an incoming batch, refusing anything malformed.
pub fn decode_raft_batch(batch: &pb::RaftBatch, self_raft_id: u64) -> Result<Vec<Message>, String> {
    if batch.messages.len() > RAFT_MESSAGES_PER_BATCH_MAX {
        return Err(format!("more than {RAFT_MESSAGES_PER_BATCH_MAX} messages in one batch"));
    }
    let mut messages = Vec::with_capacity(batch.messages.len());
    for (i, bytes) in batch.messages.iter().enumerate() {
        let message = Message::parse_from_bytes(bytes).map_err(|e| format!("message {i}: {e}"))?;
        if message.to != self_raft_id {
            return Err(format!("message {i} is for raft id {}, not {self_raft_id}", message.to));
        }
        if message.from != batch.from_raft_id || message.from == 0 {
            return Err(format!(
                "message {i} claims sender {} in a batch from {}",
                message.from, batch.from_raft_id
            ));
        }
        if raft::raw_node::is_local_msg(message.get_msg_type()) {
            return Err(format!("message {i} has local-only type {:?}", message.get_msg_type()));
        }
        messages.push(message);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot dropped at a full peer queue is reported as failed, even when the reports
    /// queue is full at that moment (a lost report would leave raft's progress for the
    /// follower in `Snapshot` state, paused for good).
    #[tokio::test]
    async fn a_snapshot_dropped_at_a_full_peer_queue_is_reported_even_when_reports_are_full() {
        let (reports_tx, mut reports_rx) = mpsc::channel(1);
        reports_tx
            .try_send(DeliveryReport::Unreachable { to: 9 })
            .expect("room for one");
        let sender = RaftSender::new(
            1,
            "127.0.0.1:1".into(),
            SecretInterceptor::new("a-cluster-secret-for-this-test").expect("secret"),
            Arc::default(),
            Arc::default(),
            Arc::default(),
            reports_tx,
            tokio_util::sync::CancellationToken::new(),
        );
        let message = |kind| {
            let mut m = Message {
                to: 2,
                ..Default::default()
            };
            m.set_msg_type(kind);
            m
        };
        // On this single-threaded runtime the peer task cannot run before both sends: its
        // queue is full when the snapshot comes.
        sender.send(
            (0..PEER_QUEUE_MAX)
                .map(|_| message(MessageType::MsgHeartbeat))
                .collect(),
        );
        sender.send(vec![message(MessageType::MsgSnapshot)]);
        let reported = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(report) = reports_rx.recv().await {
                if report
                    == (DeliveryReport::Snapshot {
                        to: 2,
                        delivered: false,
                    })
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(reported, Ok(true), "the snapshot's failure was never reported");
    }
}
