//! The composition root: builds one node from its configuration, choosing the single-node or
//! clustered implementations of the actors' ports in this one place.

use crate::auth::{Grants, TokenKeys};
use crate::config::NodeConfig;
use crate::directory::StoreDirectory;
use crate::http::{self, AppState};
use crate::mesh::{Mesh, relay::Relay};
use crate::metrics::{MetricSources, Metrics};
use crate::signal::SignalContext;
use actix_web::{App, HttpServer, web};
use mediamesh_actors::media::bwe::BweConfig;
use mediamesh_actors::media::engine::{MediaConfig, PeerFactory};
use mediamesh_actors::turn::policy::{IpNet, PeerRule, PortRange};
use mediamesh_actors::turn::{RelayConfig, TurnConfig, TurnRelay, TurnRequest};
use mediamesh_actors::{NodeId, NodeStats, RoomContext, RoomLimits, RoomRegistry};
use mediamesh_cluster::mesh::placement::Thresholds;
use mediamesh_cluster::{NodeLoad, Store, StoreConfig};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// HTTP worker threads; the media plane has its own runtime.
const HTTP_WORKERS: usize = 2;
/// Threads of the publishers' (ingress) runtime.
const INGRESS_THREADS: usize = 1;

/// The already-bound listeners of a node (tests bind port 0 and pass them in).
pub struct NodeListeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub cluster: TcpListener,
    /// The TURN listener (None: `--turn off`).
    pub turn: Option<std::net::UdpSocket>,
}

impl NodeListeners {
    pub fn bind(config: &NodeConfig) -> anyhow::Result<NodeListeners> {
        let http = TcpListener::bind(config.http)
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--http): {e}", config.http))?;
        let grpc = TcpListener::bind(config.grpc)
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--grpc): {e}", config.grpc))?;
        let cluster = TcpListener::bind(config.cluster)
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--cluster): {e}", config.cluster))?;
        let turn = match &config.turn {
            Some(turn) => Some(
                std::net::UdpSocket::bind(turn.listen)
                    .map_err(|e| anyhow::anyhow!("cannot listen on UDP {} (--turn): {e}", turn.listen))?,
            ),
            None => None,
        };
        Ok(NodeListeners {
            http,
            grpc,
            cluster,
            turn,
        })
    }
}

/// How a node is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop now (SIGINT): clients reconnect elsewhere and resume.
    Now,
    /// Drain first (SIGTERM): move every room and client off within the drain deadline, leave
    /// the cluster, then stop.
    Drain,
}

/// Runs a node until `shutdown` resolves (and, for [`Stop::Drain`], the drain is done), or a
/// drain asked through the admin API finishes. Must be called inside an actix `System` whose
/// runtime is a multi-thread tokio runtime (the media plane runs on it).
pub async fn run(
    config: NodeConfig,
    listeners: NodeListeners,
    shutdown: impl Future<Output = Stop>,
) -> anyhow::Result<()> {
    // Identity hashes in logs match across nodes that share the cluster secret.
    mediamesh_actors::pii::set_identity_salt(format!("mediamesh-pii:{}", config.cluster_secret).as_bytes());
    let http_listener = listeners.http;
    let http_addr = http_listener.local_addr()?;
    let cluster_addr = listeners.cluster.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    listeners.grpc.set_nonblocking(true)?;
    let grpc_listener = tokio::net::TcpListener::from_std(listeners.grpc)?;
    listeners.cluster.set_nonblocking(true)?;
    let cluster_listener = tokio::net::TcpListener::from_std(listeners.cluster)?;
    let store_shutdown = tokio_util::sync::CancellationToken::new();
    let mut store_config = StoreConfig::new(
        config.node_id.clone(),
        config.data_dir.join("store"),
        config.cluster_secret.clone(),
    );
    store_config.region = config.region.clone();
    store_config.advertise_cluster = format!("{}:{}", config.advertise, cluster_addr.port());
    store_config.http_url = format!("http://{}:{}", config.advertise, http_addr.port());
    // Clients are told the same gRPC address as the other nodes.
    let grpc_url = format!("http://{}:{}", config.advertise, grpc_addr.port());
    store_config.grpc_url = grpc_url.clone();
    store_config.join = config.join.clone();
    store_config.media_ip = config.advertise.to_string();
    store_config.media_ports = (config.media_port_min, config.media_port_max);
    let turn_public = match (&config.turn, &listeners.turn) {
        (Some(_), Some(socket)) => Some(turn_public_addr(socket.local_addr()?, config.advertise)),
        _ => None,
    };
    store_config.turn_addr = turn_public.map(|a| a.to_string()).unwrap_or_default();
    store_config.viewer_ttl_ms = config.viewer_ttl_ms;
    store_config.capacity = u32::try_from(config.sessions_per_node_max).unwrap_or(u32::MAX);
    store_config.heartbeat_interval_ms = 0; // the node reports its load itself, below
    store_config.node_dead_after_ms = config.heartbeat_interval_ms * u64::from(config.dead_after_missed);
    let store = Store::open(store_config, store_shutdown.clone().cancelled_owned())
        .await
        .map_err(|e| anyhow::anyhow!("store: {e}"))?;
    let ingress_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(INGRESS_THREADS)
        .thread_name("mediamesh-ingress")
        .enable_all()
        .build()?;
    let arbiter_count = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let arbiters: Vec<actix::Arbiter> = (0..arbiter_count).map(|_| actix::Arbiter::new()).collect();
    let factory = PeerFactory::new(MediaConfig {
        ip: config.advertise,
        port_min: config.media_port_min,
        port_max: config.media_port_max,
        gathering_timeout: Duration::from_secs(5),
    });
    let ports = Arc::clone(factory.ports());
    let stats = Arc::new(NodeStats::default());
    let counters = Arc::new(Default::default());
    let usage = crate::usage::UsageMeter::new(config.test_clock_offset_ms);
    let context = Arc::new(RoomContext {
        node: NodeId(config.node_id.clone()),
        factory,
        limits: RoomLimits {
            rooms_per_node_max: config.rooms_per_node_max,
            sessions_per_node_max: config.sessions_per_node_max,
            subscribers_per_room_max: config.subscribers_per_room_max,
            publishers_per_room_max: config.publishers_per_room_max,
        },
        counters: Arc::clone(&counters),
        stats: Arc::clone(&stats),
        bwe: BweConfig::default(),
        media_runtime: tokio::runtime::Handle::current(),
        ingress_runtime: ingress_runtime.handle().clone(),
        usage: Arc::new(crate::usage::MeterPort(Arc::clone(&usage))),
    });
    let thresholds = Thresholds {
        cpu_max: config.placement_cpu_max,
        ..Thresholds::default()
    };
    let mesh = Mesh::new(
        store.clone(),
        config.region.clone(),
        thresholds,
        &config.cluster_secret,
        Arc::clone(&counters),
        config.mask_names,
    )?;
    let registry = RoomRegistry::new(
        context,
        Arc::new(StoreDirectory::new(store.clone(), config.region.clone(), thresholds)),
        Arc::new(Relay(Arc::clone(&mesh))),
        arbiters.iter().map(|a| a.handle()).collect(),
    );
    mesh.set_registry(Arc::clone(&registry));
    let turn = match (&config.turn, listeners.turn, turn_public) {
        (Some(settings), Some(socket), Some(public_addr)) => {
            let turn_config = TurnConfig {
                relay: RelayConfig {
                    realm: settings.realm.clone(),
                    relay_bind_ip: settings.listen.ip(),
                    relay_public_ip: public_addr.ip(),
                    relay_ports: settings.relay_ports,
                    allocations_per_identity_max: settings.allocations_per_identity_max,
                    allocations_max: settings.allocations_max,
                    allocation_bytes_per_second_max: settings.allocation_bytes_per_second_max,
                    secret_grace_ms: settings.secret_grace_ms,
                },
                node: NodeId(config.node_id.clone()),
                region: config.region.clone(),
                public_addr,
                own_media: PeerRule {
                    net: IpNet::host(config.advertise),
                    ports: PortRange {
                        min: config.media_port_min,
                        max: config.media_port_max,
                    },
                },
                allow: settings.allow.clone(),
                offer_ranges: settings.offer_ranges.clone(),
                credential_ttl: Duration::from_millis(settings.credential_ttl_ms),
            };
            let directory = Arc::new(crate::turn::StoreTurnDirectory::new(
                store.clone(),
                config.node_id.clone(),
            ));
            Some(TurnRelay::start(turn_config, socket, directory)?)
        }
        _ => None,
    };
    let keys = TokenKeys::new(&config.api_secret);
    let signal = SignalContext::new(
        config.node_id.clone(),
        keys.clone(),
        &config.cluster_secret,
        Arc::clone(&registry),
        store.clone(),
        Duration::from_millis(config.signal_idle_timeout_ms),
        Duration::from_millis(config.resume_window_ms),
        grpc_url,
        config.signal_sessions_max,
        turn.as_ref().map(|(_, handle)| handle.clone()),
        config.mask_names,
    );
    let grpc_shutdown = tokio_util::sync::CancellationToken::new();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(crate::signal::grpc::service(Arc::clone(&signal)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                grpc_shutdown.clone().cancelled_owned(),
            ),
    );
    let signal_data = web::Data::new(Arc::clone(&signal));
    let heartbeat_interval = Duration::from_millis(config.heartbeat_interval_ms);
    let heartbeat = tokio::spawn(report_load(
        store.clone(),
        Arc::clone(&stats),
        Arc::clone(&counters),
        heartbeat_interval,
    ));
    let usage_stop = tokio_util::sync::CancellationToken::new();
    let usage_flusher = tokio::spawn(crate::usage::run_flusher(
        Arc::clone(&usage),
        store.clone(),
        Duration::from_millis(config.usage_flush_ms),
        usage_stop.clone().cancelled_owned(),
    ));
    let failover = tokio::spawn(crate::mesh::failover::run(
        Arc::clone(&mesh),
        heartbeat_interval,
        config.dead_after_missed,
    ));
    // A drain (admin API or SIGTERM) runs once; the node stops when it is done.
    let drained = tokio_util::sync::CancellationToken::new();
    let start_drain: crate::mesh::service::DrainStarter = {
        let (mesh, drained) = (Arc::clone(&mesh), drained.clone());
        let started = std::sync::atomic::AtomicBool::new(false);
        let signal_stats = Arc::clone(&signal.stats);
        let deadline = Duration::from_millis(config.drain_deadline_ms);
        Arc::new(move || {
            if started.swap(true, Ordering::AcqRel) {
                return false;
            }
            let (mesh, drained, signal_stats) = (Arc::clone(&mesh), drained.clone(), Arc::clone(&signal_stats));
            tokio::spawn(async move {
                let open = Arc::new(move || signal_stats.open_sessions());
                crate::mesh::migrate::drain(mesh, deadline, open).await;
                drained.cancel();
            });
            true
        })
    };
    // The cluster port: the store's service and the mesh's, one server. Other nodes' calls
    // that arrive before it listens are refused and retried (raft, joins) like any lost call.
    let cluster_routes =
        crate::mesh::service::routes(Arc::clone(&mesh), Arc::clone(&start_drain), &config.cluster_secret)
            .add_service(mediamesh_cluster::server::service(&store));
    mediamesh_cluster::server::serve(
        cluster_routes,
        cluster_listener,
        store_shutdown.clone().cancelled_owned(),
    );
    let telemetry = crate::telemetry::init(&config.telemetry());
    let metrics = Arc::new(Metrics::new(MetricSources {
        stats: Arc::clone(&stats),
        counters,
        ports,
        signal: Arc::clone(&signal.stats),
        store: store.store_metrics().clone(),
        telemetry: Arc::clone(&telemetry),
        runtimes: vec![tokio::runtime::Handle::current(), ingress_runtime.handle().clone()],
        turn: turn.as_ref().map(|(_, handle)| Arc::clone(&handle.stats)),
        relay: Arc::clone(&mesh.stats),
        usage: Arc::clone(&usage),
    }));
    let otlp_metrics = telemetry.otlp_endpoint().map(|endpoint| {
        let metrics = Arc::clone(&metrics);
        tokio::spawn(crate::telemetry::otlp_metrics::push_forever(
            endpoint.to_string(),
            vec![
                ("service.name".into(), "mediamesh".into()),
                ("service.instance.id".into(), config.node_id.clone()),
                ("cloud.region".into(), config.region.clone()),
            ],
            move || metrics.gather(),
        ))
    });
    if let Some(synthetic) = config.synthetic.clone() {
        tokio::spawn(crate::synthetic::run(store.clone(), synthetic));
    }
    let state = web::Data::new(AppState {
        node_id: config.node_id.clone(),
        region: config.region.clone(),
        keys: keys.clone(),
        rooms: Arc::clone(&registry),
        metrics: Arc::clone(&metrics),
        turn: turn.clone(),
        body_bytes_max: config.body_bytes_max,
        store: store.clone(),
        mesh: Arc::clone(&mesh),
        mask_names: config.mask_names,
        start_drain: Arc::clone(&start_drain),
        test_faults: config.test_faults,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(signal_data.clone())
            .app_data(web::PayloadConfig::new(config.body_bytes_max))
            .wrap(http::cors_headers())
            .wrap(actix_web::middleware::from_fn(http::observe::observe))
            .configure(http::routes)
            .configure(http::extractor_errors)
    })
    .workers(HTTP_WORKERS)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(http_listener)?
    .run();
    let admin_token = keys.create(
        "dashboard",
        "*",
        Grants {
            admin: true,
            ..Default::default()
        },
        Duration::from_secs(12 * 3600),
    );
    tracing::info!(
        node = %config.node_id,
        region = %config.region,
        http = %http_addr,
        grpc = %grpc_addr,
        media_ports = %format!("{}-{}", config.media_port_min, config.media_port_max),
        advertise = %config.advertise,
        cluster = %cluster_addr,
        turn = %turn_public.map_or_else(|| "off".to_string(), |a| a.to_string()),
        "node started; dashboard: http://{}/#token={}",
        http_addr,
        admin_token
    );
    let handle = server.handle();
    let server_task = tokio::spawn(server);
    tokio::select! {
        stop = shutdown => {
            if stop == Stop::Drain {
                start_drain(); // false when one already runs: it is waited for the same way
                drained.cancelled().await;
            }
        }
        _ = drained.cancelled() => {}
    }
    tracing::info!("shutting down");
    handle.stop(true).await;
    let _ = server_task.await;
    grpc_shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(5), grpc_server).await.is_err() {
        tracing::warn!("gRPC server did not stop within 5 s");
    }
    if let Some((relay, _)) = &turn {
        let _ = relay.send(TurnRequest::Stop).await;
    }
    for arbiter in arbiters {
        arbiter.stop();
    }
    // The last viewer time goes into the ledger while the store still runs.
    usage_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(3), usage_flusher)
        .await
        .is_err()
    {
        tracing::warn!("the last usage flush did not finish within 3 s");
    }
    heartbeat.abort();
    failover.abort();
    if let Some(task) = otlp_metrics {
        task.abort();
    }
    telemetry.flush();
    ingress_runtime.shutdown_background();
    store.shutdown();
    store_shutdown.cancel();
    store.closed().await;
    tracing::info!("stopped");
    Ok(())
}

/// The TURN address clients use: the listener's, with the advertised IP when it listens on all.
fn turn_public_addr(listen: SocketAddr, advertise: IpAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(advertise, listen.port())
    } else {
        listen
    }
}

/// Reports this node's load (CPU, connections, rooms) to the store, which also keeps it alive in
/// the membership.
async fn report_load(
    store: Store,
    stats: Arc<NodeStats>,
    counters: Arc<mediamesh_actors::media::track::MediaCounters>,
    every: Duration,
) {
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let mut interval = tokio::time::interval(every);
    let mut last_cpu = crate::metrics::process_cpu_seconds();
    let mut last_at = std::time::Instant::now();
    let mut last_bytes = counters.bytes_forwarded.load(Ordering::Relaxed);
    loop {
        interval.tick().await;
        let bytes = counters.bytes_forwarded.load(Ordering::Relaxed);
        let cpu = crate::metrics::process_cpu_seconds();
        let elapsed = last_at.elapsed().as_secs_f64().max(1e-3);
        let load = NodeLoad {
            cpu: ((cpu - last_cpu) / elapsed / cores) as f32,
            connections: stats.active_connections.load(Ordering::Relaxed).max(0) as u64,
            rooms: stats.rooms.load(Ordering::Relaxed).max(0) as u64,
            egress_bps: (bytes.saturating_sub(last_bytes) as f64 * 8.0 / elapsed) as u64,
        };
        (last_cpu, last_at, last_bytes) = (cpu, std::time::Instant::now(), bytes);
        if let Err(error) = store.heartbeat(load).await {
            tracing::debug!(%error, "load report not committed");
        }
    }
}

/// Resolves on SIGINT ([`Stop::Now`]) or SIGTERM ([`Stop::Drain`]).
pub async fn shutdown_signal() -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::error!("signal handlers could not be installed; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => Stop::Now,
        _ = terminate.recv() => Stop::Drain,
    }
}
