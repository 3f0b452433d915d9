//! The mesh between nodes, as the node runs it: the media relay (`relay`), room migration and
//! drain (`migrate`), failover (`failover`), and the `Mesh` gRPC service on the cluster port
//! (`service`). The decisions are the sans-IO cores of `mediamesh_cluster::mesh` (the
//! simulator drives the same ones); the tasks here feed them events and time and carry out
//! their actions, and take their timings from `mediamesh_cluster::mesh::timing`.

pub mod failover;
pub mod migrate;
pub mod overview;
pub mod relay;
pub mod service;

use mediamesh_actors::RoomRegistry;
use mediamesh_actors::media::track::MediaCounters;
use mediamesh_cluster::Store;
use mediamesh_cluster::mesh::placement::Thresholds;
/// The store's node view as placement candidates: the cluster's rule, which the simulator runs
/// too.
pub use mediamesh_cluster::mesh::placement::candidates;
use mediamesh_cluster::transport::SecretInterceptor;
use mediamesh_proto::mesh::v1::mesh_client::MeshClient;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Connecting to another node's cluster port gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest mesh message (a relayed RTP packet is ~1.2 KiB; a snapshot a few KiB).
pub const MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

pub type Client = MeshClient<InterceptedService<Channel, SecretInterceptor>>;

/// Buckets of `mediamesh_migration_duration_seconds`.
const MIGRATION_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0];

/// Relay, migration and failover counters, read by the metrics endpoint.
#[derive(Debug)]
pub struct RelayStats {
    /// Track streams this node pulls from other nodes now.
    pub streams_in: AtomicI64,
    /// Track streams other nodes pull from this node now.
    pub streams_out: AtomicI64,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    /// Room migrations finished here as the source, by outcome.
    pub migrations_moved: AtomicU64,
    pub migrations_failed: AtomicU64,
    /// Rooms this node re-placed after their host died (as leader).
    pub failovers: AtomicU64,
    /// Migrations run here as the source, from start to the last client gone (created here,
    /// registered by the metrics, like the store's and the media plane's histograms).
    pub migration_seconds: prometheus::Histogram,
}

impl Default for RelayStats {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "mediamesh_migration_duration_seconds",
            "Duration of room migrations run here, from the handoff to the last client gone",
        )
        .buckets(MIGRATION_BUCKETS.to_vec());
        Self {
            streams_in: AtomicI64::default(),
            streams_out: AtomicI64::default(),
            packets_in: AtomicU64::default(),
            packets_out: AtomicU64::default(),
            migrations_moved: AtomicU64::default(),
            migrations_failed: AtomicU64::default(),
            failovers: AtomicU64::default(),
            // Static options: creating the histogram cannot fail.
            migration_seconds: prometheus::Histogram::with_opts(opts).expect("valid histogram options"),
        }
    }
}

/// The mesh's Prometheus families, mirrored from [`RelayStats`] at scrape time.
pub struct MeshMetrics {
    stats: Arc<RelayStats>,
    streams: prometheus::IntGaugeVec,
    packets: prometheus::IntCounterVec,
    migrations: prometheus::IntCounterVec,
    failovers: prometheus::IntCounter,
}

impl MeshMetrics {
    pub fn new(registry: &prometheus::Registry, stats: Arc<RelayStats>) -> Self {
        use crate::metrics::register;
        use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
        register(registry, Ok(stats.migration_seconds.clone()));
        Self {
            streams: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "mediamesh_relay_streams",
                        "Track streams relayed between nodes now (in: pulled from another node; out: pulled by one)",
                    ),
                    &["direction"],
                ),
            ),
            packets: register(
                registry,
                IntCounterVec::new(
                    Opts::new("mediamesh_relay_packets_total", "RTP packets relayed between nodes"),
                    &["direction"],
                ),
            ),
            migrations: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "mediamesh_migrations_total",
                        "Room migrations this node ran as the source, by outcome",
                    ),
                    &["outcome"],
                ),
            ),
            failovers: register(
                registry,
                IntCounter::new(
                    "mediamesh_failover_rooms_total",
                    "Rooms this node re-placed, as leader, after their host died",
                ),
            ),
            stats,
        }
    }

    pub fn sync(&self) {
        use crate::metrics::Metrics;
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        self.streams.with_label_values(&["in"]).set(s.streams_in.load(Relaxed));
        self.streams
            .with_label_values(&["out"])
            .set(s.streams_out.load(Relaxed));
        Metrics::sync_counter(&self.packets.with_label_values(&["in"]), s.packets_in.load(Relaxed));
        Metrics::sync_counter(&self.packets.with_label_values(&["out"]), s.packets_out.load(Relaxed));
        Metrics::sync_counter(
            &self.migrations.with_label_values(&["moved"]),
            s.migrations_moved.load(Relaxed),
        );
        Metrics::sync_counter(
            &self.migrations.with_label_values(&["failed"]),
            s.migrations_failed.load(Relaxed),
        );
        Metrics::sync_counter(&self.failovers, s.failovers.load(Relaxed));
    }
}

/// What every mesh task shares.
pub struct Mesh {
    pub store: Store,
    pub node: String,
    pub region: String,
    pub thresholds: Thresholds,
    registry: OnceLock<Arc<RoomRegistry>>,
    secret: SecretInterceptor,
    clients: Mutex<HashMap<String, Client>>,
    pub counters: Arc<MediaCounters>,
    pub stats: Arc<RelayStats>,
    /// Migrations run here as the source: in flight and recently finished.
    pub migrations: Mutex<overview::MigrationLog>,
    /// `--mask-names`: names shown to operators are masked when they have Hangul.
    pub mask_names: bool,
}

impl Mesh {
    pub fn new(
        store: Store,
        region: String,
        thresholds: Thresholds,
        cluster_secret: &str,
        counters: Arc<MediaCounters>,
        mask_names: bool,
    ) -> anyhow::Result<Arc<Mesh>> {
        let secret = SecretInterceptor::new(cluster_secret).map_err(anyhow::Error::msg)?;
        Ok(Arc::new(Mesh {
            node: store.node_id().as_str().to_string(),
            store,
            region,
            thresholds,
            registry: OnceLock::new(),
            secret,
            clients: Mutex::new(HashMap::new()),
            counters,
            stats: Arc::default(),
            migrations: Mutex::default(),
            mask_names,
        }))
    }

    /// Set once, by the node wiring, after the registry exists.
    pub fn set_registry(&self, registry: Arc<RoomRegistry>) {
        let _ = self.registry.set(registry);
    }

    pub fn registry(&self) -> Result<&Arc<RoomRegistry>, tonic::Status> {
        self.registry
            .get()
            .ok_or_else(|| tonic::Status::unavailable("the node is starting"))
    }

    /// A client of `node`'s mesh service (its cluster port, from the membership).
    pub fn client(&self, node: &str) -> Result<Client, String> {
        let addr = self
            .store
            .nodes()
            .iter()
            .find(|n| n.id.as_str() == node)
            .map(|n| n.cluster_addr.clone())
            .ok_or_else(|| format!("node {node} is not registered"))?;
        let mut clients = self.clients.lock();
        if let Some(client) = clients.get(&addr) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad cluster address {addr}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let client = MeshClient::with_interceptor(endpoint.connect_lazy(), self.secret.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        clients.insert(addr, client.clone());
        Ok(client)
    }
}

/// A mesh request carrying the current trace context (the other node's spans join the trace).
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    mediamesh_cluster::trace_context::inject_current(request.metadata_mut());
    request
}
