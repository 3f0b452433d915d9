//! Test harness: several store replicas in one process, each on a port-0 listener with its own
//! data directory and shutdown trigger, over the real tonic transport.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mediamesh_cluster::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const SECRET: &str = "test-cluster-secret";

/// Fast timeouts: 50 ms ticks, elections after 10 ticks (500..1000 ms), heartbeats every 2.
pub fn fast_config(name: &str, dir: &Path, join: Vec<String>) -> StoreConfig {
    init_logging();
    let mut c = StoreConfig::new(name, dir, SECRET);
    c.join = join;
    c.tick_ms = 50;
    c.election_ticks = 10;
    c.heartbeat_ticks = 2;
    c.request_timeout_ms = 3_000;
    c.heartbeat_interval_ms = 500;
    c.http_url = format!("http://{name}.test:8080");
    c.grpc_url = format!("http://{name}.test:8081");
    c
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
}

impl Node {
    pub async fn start(config: StoreConfig) -> Result<Node, mediamesh_cluster::StoreError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let (stop, stopped) = oneshot::channel::<()>();
        let name = config.node_id.clone();
        let dir = config.data_dir.clone();
        let store = mediamesh_cluster::server::start(config, listener, async move {
            let _ = stopped.await;
        })
        .await?;
        Ok(Node {
            name,
            dir,
            store,
            stop: Some(stop),
        })
    }

    /// Stops the node and waits until its data directory is released.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.store.closed())
            .await
            .expect("store closes within 10 s");
    }
}

/// Starts a cluster of `n` nodes: the first bootstraps, the others join it. Waits until every
/// node is ready and a voter.
pub async fn start_cluster(root: &Path, n: usize, tune: impl Fn(&mut StoreConfig)) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut first_addr = String::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let join = if i == 0 { vec![] } else { vec![first_addr.clone()] };
        let mut config = fast_config(&name, &root.join(&name), join);
        tune(&mut config);
        let node = Node::start(config).await.expect("node starts");
        if i == 0 {
            first_addr = node.store.advertise_cluster().to_string();
        }
        nodes.push(node);
    }
    for node in &nodes {
        within(Duration::from_secs(15), node.store.wait_ready())
            .await
            .expect("ready");
    }
    wait_for(Duration::from_secs(15), || {
        let status = nodes[0].store.status();
        status.nodes.len() == n
            && status
                .nodes
                .iter()
                .all(|s| s.membership == mediamesh_cluster::Membership::Voter)
    })
    .await;
    nodes
}

pub async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .expect("operation finished in time")
}

/// Polls `condition` every 20 ms until it holds; panics after `limit`. Used where the condition
/// is a cross-replica property that no single event announces (convergence, expiry).
pub async fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leader all given nodes agree on, if they do.
pub fn agreed_leader(stores: &[&Store]) -> Option<u64> {
    let leaders: Vec<u64> = stores.iter().map(|s| s.status().leader_raft_id).collect();
    (leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0])).then_some(leaders[0])
}

/// Waits until every node has applied the same state (equal digests and applied index).
pub async fn wait_converged(stores: &[&Store], limit: Duration) {
    wait_for(limit, || {
        let statuses: Vec<_> = stores.iter().map(|s| s.status()).collect();
        statuses
            .iter()
            .all(|s| s.digest == statuses[0].digest && s.applied_index == statuses[0].applied_index)
    })
    .await;
}

/// Cuts `isolated` off from `others`, both directions.
pub fn partition(isolated: &Store, others: &[&Store]) {
    let other_ids: Vec<u64> = others.iter().map(|s| s.raft_id()).collect();
    isolated.fault_injector().block(&other_ids);
    for other in others {
        other.fault_injector().block(&[isolated.raft_id()]);
    }
}

pub fn heal(stores: &[&Store]) {
    for s in stores {
        s.fault_injector().heal();
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
