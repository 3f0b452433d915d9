//! The composition root: builds one node from its configuration, choosing the single-node or
//! clustered implementations of the actors' ports in this one place.

use crate::auth::{Grants, TokenKeys};
use crate::config::NodeConfig;
use crate::directory::LocalDirectory;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use actix_web::{App, HttpServer, web};
use mediamesh_actors::media::bwe::BweConfig;
use mediamesh_actors::media::engine::{MediaConfig, PeerFactory};
use mediamesh_actors::{NodeId, NodeStats, RoomContext, RoomLimits, RoomRegistry};
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// HTTP worker threads; the media plane has its own runtime.
const HTTP_WORKERS: usize = 2;

/// Runs a node until `shutdown` resolves. Must be called inside an actix `System` whose
/// runtime is a multi-thread tokio runtime (the media plane runs on it).
pub async fn run(
    config: NodeConfig,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
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
    });
    let registry = RoomRegistry::new(
        context,
        Arc::new(LocalDirectory::default()),
        arbiters.iter().map(|a| a.handle()).collect(),
    );
    let keys = TokenKeys::new(&config.api_secret);
    let ready = Arc::new(AtomicBool::new(true));
    let state = web::Data::new(AppState {
        node_id: config.node_id.clone(),
        region: config.region.clone(),
        keys: keys.clone(),
        rooms: Arc::clone(&registry),
        metrics: Arc::new(Metrics::new(stats, counters, ports)),
        body_bytes_max: config.body_bytes_max,
        ready,
    });
    let http_addr = http_listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(config.body_bytes_max))
            .wrap(http::cors_headers())
            .configure(http::routes)
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
        media_ports = %format!("{}-{}", config.media_port_min, config.media_port_max),
        advertise = %config.advertise,
        "node started; dashboard: http://{}/#token={}",
        http_addr,
        admin_token
    );
    let handle = server.handle();
    let server_task = tokio::spawn(server);
    shutdown.await;
    tracing::info!("shutting down");
    handle.stop(true).await;
    let _ = server_task.await;
    for (_, room) in registry.list() {
        drop(room);
    }
    for arbiter in arbiters {
        arbiter.stop();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::error!("signal handlers could not be installed; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}
