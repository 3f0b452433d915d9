//! Test and bench support: a cluster of `mediamesh node` processes on loopback, each with its own
//! data directory, that can be killed with SIGKILL and restarted with the same flags.
//!
//! Used by `tests/cluster_process.rs` (debug binary) and `benches/store.rs` (release binary), both
//! through `#[path]`, so it depends on nothing but the dev-dependencies both have.
//!
//! What a restart needs (found by reading `cluster/src/store.rs` and checked by the test): nothing
//! but the same data directory and flags. A data directory that already holds a raft log is never
//! bootstrapped again and never joins again (`--join` is ignored then), so the restarted node
//! resumes as the same voter; it only re-registers if its announced addresses changed. Ports are
//! the same on restart, so the other nodes' address books stay right.

#![allow(dead_code)] // the test and the bench use different parts of this module

use mediamesh::auth::{Grants, TokenKeys};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A token for `identity` in `room` with the grants an SDK client of `role` needs.
pub fn sdk_token(secret: &str, room: &str, identity: &str, role: mediamesh_sdk::Role) -> String {
    use mediamesh_sdk::Role;
    let grants = Grants {
        publish: role != Role::Subscriber,
        subscribe: role != Role::Publisher,
        admin: false,
    };
    TokenKeys::new(secret).create(identity, room, grants, Duration::from_secs(3600))
}

/// SDK options of the mesh tests and bench: WebSocket, reconnects after 100–500 ms, the playback
/// position reported every 0.5 s.
pub fn sdk_options(room: &str, role: mediamesh_sdk::Role, region: &str) -> mediamesh_sdk::ClientOptions {
    mediamesh_sdk::ClientOptions {
        transport: mediamesh_sdk::Transport::WebSocket,
        room: room.to_string(),
        role,
        region: region.to_string(),
        position_interval: Some(Duration::from_millis(500)),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        ..Default::default()
    }
}

/// Loopback TCP ports are picked below the ephemeral range (32768 on Linux), so an outgoing
/// connection cannot take a node's port while the node is down between a kill and a restart.
const TCP_PORTS_LOW: u16 = 10_000;
const TCP_PORTS_HIGH: u16 = 19_999;
/// Media UDP ports (never bound by these tests, but each node gets its own range).
const UDP_PORTS_LOW: u16 = 20_000;
const UDP_PORTS_HIGH: u16 = 29_999;
const MEDIA_PORTS_PER_NODE: u16 = 160;
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// The flags of one node; the same on every (re)start.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: String,
    pub region: String,
    pub http_port: u16,
    pub cluster_port: u16,
    pub grpc_port: u16,
    pub media_ports: (u16, u16),
    /// Its TURN port on 127.0.0.1; its relay sockets use the ports after it.
    pub turn_port: u16,
    pub relay_ports: (u16, u16),
    /// Cluster address of the node to join on the first start (None: bootstrap).
    pub join: Option<String>,
}

pub struct ClusterNode {
    pub spec: NodeSpec,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Starts so far (1 after the first start).
    pub starts: u32,
}

impl ClusterNode {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.http_port)
    }

    pub fn cluster_addr(&self) -> String {
        format!("127.0.0.1:{}", self.spec.cluster_port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Clusters started so far by this process: several tests of one binary run at once, and each
/// picks its ports from a different place.
static PICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn pick_offset(multiplier: u64, span: u16) -> u16 {
    let pick = PICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ((std::process::id() as u64 * multiplier + pick * 997) % u64::from(span)) as u16
}

/// Distinct loopback TCP ports that are free now, below the ephemeral range.
fn pick_tcp_ports(count: usize) -> Vec<u16> {
    let span = TCP_PORTS_HIGH - TCP_PORTS_LOW;
    let offset = pick_offset(7919, span);
    let mut ports = Vec::with_capacity(count);
    for step in 0..span {
        let port = TCP_PORTS_LOW + (offset + step) % span;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == count {
                return ports;
            }
        }
    }
    panic!("no {count} free loopback TCP ports in {TCP_PORTS_LOW}-{TCP_PORTS_HIGH}");
}

/// `count` disjoint UDP ranges of `MEDIA_PORTS_PER_NODE` ports, free now.
fn pick_udp_ranges(count: usize) -> Vec<(u16, u16)> {
    let span = UDP_PORTS_HIGH - UDP_PORTS_LOW;
    let blocks = span / MEDIA_PORTS_PER_NODE;
    let offset = pick_offset(104_729, blocks);
    let mut ranges = Vec::with_capacity(count);
    for step in 0..blocks {
        let start = UDP_PORTS_LOW + ((offset + step) % blocks) * MEDIA_PORTS_PER_NODE;
        let end = start + MEDIA_PORTS_PER_NODE - 1;
        if (start..=end).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
            ranges.push((start, end));
            if ranges.len() == count {
                return ranges;
            }
        }
    }
    panic!("no {count} free UDP ranges in {UDP_PORTS_LOW}-{UDP_PORTS_HIGH}");
}

/// Three (or more) node processes; the first bootstraps, the others join it. Dropping it kills
/// every child (also on panic, when it prints the tail of each node's log first) and removes the
/// data directories.
/// Cluster starts tried when a port picked for a node was taken before the node bound it.
const PORT_ATTEMPTS_MAX: usize = 3;

pub struct ProcessCluster {
    binary: PathBuf,
    pub root: PathBuf,
    pub nodes: Vec<ClusterNode>,
    pub secret: String,
    pub admin_token: String,
    /// For status polls and waits (short timeouts).
    control: reqwest::blocking::Client,
}

impl ProcessCluster {
    /// Starts `ids` = [(node id, region)] with `extra` flags on every node, waits until every
    /// node is ready and all are voters, within `timeout`.
    pub fn start(binary: &Path, ids: &[(&str, &str)], extra: &[&str], timeout: Duration) -> ProcessCluster {
        // Ports are picked free and released before the nodes bind them, so another test can
        // take one meanwhile: a node that exits on "Address already in use" gets the whole
        // cluster started again on other ports.
        for attempt in 1..=PORT_ATTEMPTS_MAX {
            let mut cluster = Self::prepare(binary, ids, extra);
            match cluster.boot(Instant::now() + timeout) {
                Ok(()) => return cluster,
                Err(e) if attempt < PORT_ATTEMPTS_MAX && cluster.port_was_taken() => {
                    eprintln!(
                        "cluster start, attempt {attempt}: {e} (a port was taken meanwhile); again on other ports"
                    );
                }
                Err(e) => {
                    for i in 0..cluster.nodes.len() {
                        eprintln!("---- last lines of {} ----", cluster.nodes[i].spec.id);
                        for line in cluster.log_tail(i, 10) {
                            eprintln!("{line}");
                        }
                    }
                    panic!("{e}");
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// True when a node's log says a port it was given was in use.
    fn port_was_taken(&self) -> bool {
        (0..self.nodes.len()).any(|i| {
            self.log_tail(i, 20)
                .iter()
                .any(|l| l.contains("Address already in use"))
        })
    }

    /// Starts the first node, then the others, and waits for all of them to be voters.
    fn boot(&mut self, deadline: Instant) -> Result<(), String> {
        self.spawn(0);
        self.try_wait_ready(0, deadline)?;
        for i in 1..self.nodes.len() {
            self.spawn(i);
        }
        for i in 1..self.nodes.len() {
            self.try_wait_ready(i, deadline)?;
        }
        self.wait_all_voters(deadline);
        Ok(())
    }

    fn prepare(binary: &Path, ids: &[(&str, &str)], extra: &[&str]) -> ProcessCluster {
        assert!(!ids.is_empty());
        let root = std::env::temp_dir().join(format!("mediamesh-cluster-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&root).expect("create the cluster's temp directory");
        let ports = pick_tcp_ports(ids.len() * 3);
        // Media ranges, then one range per node for its TURN port and relay sockets.
        let media = pick_udp_ranges(ids.len() * 2);
        let secret = format!("cluster-test-secret-{}", uuid::Uuid::now_v7().simple());
        let first_cluster = format!("127.0.0.1:{}", ports[1]);
        let nodes = ids
            .iter()
            .enumerate()
            .map(|(i, (id, region))| {
                let spec = NodeSpec {
                    id: id.to_string(),
                    region: region.to_string(),
                    http_port: ports[i * 3],
                    cluster_port: ports[i * 3 + 1],
                    grpc_port: ports[i * 3 + 2],
                    media_ports: media[i],
                    turn_port: media[ids.len() + i].0,
                    relay_ports: (media[ids.len() + i].0 + 1, media[ids.len() + i].1),
                    join: (i > 0).then(|| first_cluster.clone()),
                };
                let data_dir = root.join(id);
                let log_path = root.join(format!("{id}.log"));
                let mut args: Vec<String> = [
                    "node",
                    "--node-id",
                    id,
                    "--region",
                    region,
                    "--data-dir",
                    &data_dir.display().to_string(),
                    "--http",
                    &format!("127.0.0.1:{}", spec.http_port),
                    "--cluster",
                    &format!("127.0.0.1:{}", spec.cluster_port),
                    "--grpc",
                    &format!("127.0.0.1:{}", spec.grpc_port),
                    "--advertise",
                    "127.0.0.1",
                    "--media-ports",
                    &format!("{}-{}", spec.media_ports.0, spec.media_ports.1),
                    "--api-secret",
                    &secret,
                    "--cluster-secret",
                    &secret,
                    "--log-format",
                    "json",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some(join) = &spec.join {
                    args.extend(["--join".to_string(), join.clone()]);
                }
                args.extend([
                    "--turn".to_string(),
                    format!("127.0.0.1:{}", spec.turn_port),
                    "--turn-relay-ports".to_string(),
                    format!("{}-{}", spec.relay_ports.0, spec.relay_ports.1),
                ]);
                args.extend(extra.iter().map(|s| s.to_string()));
                ClusterNode {
                    spec,
                    data_dir,
                    log_path,
                    args,
                    child: None,
                    starts: 0,
                }
            })
            .collect();
        let admin_token = TokenKeys::new(&secret).create(
            "cluster-test",
            "*",
            Grants {
                admin: true,
                ..Default::default()
            },
            Duration::from_secs(3600),
        );
        let control = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        ProcessCluster {
            binary: binary.to_path_buf(),
            root,
            nodes,
            secret,
            admin_token,
            control,
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.spec.id);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .expect("open the node's log file");
        // try_clone of a file we just opened only fails when out of file descriptors.
        let log_err = log.try_clone().expect("clone the log file handle");
        let child = Command::new(&self.binary)
            .args(&node.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        node.child = Some(child);
        node.starts += 1;
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", node.spec.id));
        // Child::kill sends SIGKILL on Unix.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM (a drain), then waits up to `within` for the process to exit: its exit status,
    /// or `None` if it was still running (then it is killed).
    pub fn terminate(&mut self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", node.spec.id));
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a killed node again with the same flags and data directory.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Waits until node `i` answers `/readyz` with 200 (its store has a leader and the node is
    /// registered). Errs at `deadline` or if the process exits.
    pub fn try_wait_ready(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let url = format!("{}/readyz", self.nodes[i].base_url());
        loop {
            if !self.nodes[i].is_running() {
                return Err(format!("{} exited while starting", self.nodes[i].spec.id));
            }
            if let Ok(r) = self.control.get(&url).send()
                && r.status() == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("{} not ready in time", self.nodes[i].spec.id));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn wait_ready(&mut self, i: usize, deadline: Instant) {
        if let Err(e) = self.try_wait_ready(i, deadline) {
            panic!("{e}");
        }
    }

    /// `GET /admin/v1/cluster` of node `i`.
    pub fn status(&self, i: usize) -> Result<Value, String> {
        let response = self
            .control
            .get(format!("{}/admin/v1/cluster?digest=true", self.nodes[i].base_url()))
            .bearer_auth(&self.admin_token)
            .send()
            .map_err(|e| e.to_string())?;
        if response.status() != 200 {
            return Err(format!("status {}", response.status()));
        }
        response.json().map_err(|e| e.to_string())
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.spec.id == id)
    }

    /// The leader as seen by the first running node that knows one.
    pub fn leader(&mut self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            if let Ok(status) = self.status(i)
                && let Some(leader) = status["leader"].as_str()
            {
                return self.index_of(leader);
            }
        }
        None
    }

    /// Waits until every node reports all nodes as voters and the same leader.
    pub fn wait_all_voters(&mut self, deadline: Instant) {
        let count = self.nodes.len();
        loop {
            let statuses: Vec<_> = (0..count).map(|i| self.status(i)).collect();
            let good = statuses.iter().all(|s| {
                s.as_ref().is_ok_and(|s| {
                    let nodes = s["nodes"].as_array().map_or(&[][..], |v| v.as_slice());
                    nodes.len() == count && nodes.iter().all(|n| n["membership"] == "voter") && s["leader"].is_string()
                })
            }) && statuses.windows(2).all(|w| match (&w[0], &w[1]) {
                (Ok(a), Ok(b)) => a["leader"] == b["leader"],
                _ => false,
            });
            if good {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the cluster did not reach {count} voters in time: {statuses:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls every node until all report the same applied index and digest, with the same
    /// leader; returns (applied index, digest). The nodes' heartbeats keep committing entries,
    /// so a poll sees one index on all nodes only between two of them; polls repeat quickly.
    pub fn wait_converged(&self, deadline: Instant) -> Result<(u64, String), String> {
        loop {
            let statuses: Result<Vec<Value>, String> = (0..self.nodes.len()).map(|i| self.status(i)).collect();
            if let Ok(statuses) = &statuses {
                let applied: Vec<u64> = statuses
                    .iter()
                    .map(|s| s["applied_index"].as_u64().unwrap_or(0))
                    .collect();
                let digests: Vec<&str> = statuses.iter().map(|s| s["digest"].as_str().unwrap_or("")).collect();
                if applied.windows(2).all(|w| w[0] == w[1])
                    && statuses
                        .iter()
                        .all(|s| s["leader"].is_string() && s["leader"] == statuses[0]["leader"])
                {
                    if digests.windows(2).all(|w| w[0] == w[1]) && !digests[0].is_empty() {
                        return Ok((applied[0], digests[0].to_string()));
                    }
                    // Same index, different state: that is a divergence, not lag.
                    return Err(format!("digests differ at applied index {}: {digests:?}", applied[0]));
                }
            }
            if Instant::now() >= deadline {
                let last: Vec<String> = match &statuses {
                    Ok(statuses) => statuses
                        .iter()
                        .map(|s| format!("{}:{:.12}", s["applied_index"], s["digest"].as_str().unwrap_or("")))
                        .collect(),
                    Err(e) => vec![e.clone()],
                };
                return Err(format!(
                    "no convergence in time; last (applied:digest) per node: {last:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> Vec<String> {
        let Ok(file) = File::open(&self.nodes[i].log_path) else {
            return Vec::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].to_vec()
    }

    /// Lines of node `i`'s log at level ERROR or WARN (from its JSON log).
    pub fn log_problems(&self, i: usize) -> Vec<String> {
        let Ok(file) = File::open(&self.nodes[i].log_path) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
            .collect()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!(
                    "---- last lines of {} ({}) ----",
                    self.nodes[i].spec.id,
                    self.nodes[i].log_path.display()
                );
                for line in self.log_tail(i, LOG_TAIL_LINES) {
                    eprintln!("{line}");
                }
            }
        }
        if std::env::var_os("MEDIAMESH_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
