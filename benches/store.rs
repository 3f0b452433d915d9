//! Store benchmark: viewer-state updates committed per second and commit latency (p50/p99) at
//! 1, 16 and 256 concurrent writers, for
//!
//! - `mediamesh http`: three `mediamesh node` processes (release build) on loopback; each writer
//!   holds one keep-alive HTTP/1.1 connection to one node (writers spread round-robin over the
//!   three) and sends `PUT /admin/v1/viewers/{viewer}`, answered after the Raft commit. The store
//!   flushes sled before an entry counts as persisted (see `benches/README.md`, "store").
//! - `redis everysec` / `redis always`: Debian's `redis-server` on loopback with
//!   `appendonly yes` and `appendfsync everysec` (then `always`), taking `SET key value EX 300` of
//!   the same keys and values from the same number of clients (raw RESP, one connection each).
//! - `store in-process`: the same three-replica Raft store (`mediamesh_cluster::Store`) in this
//!   process, written with `Store::upsert_viewer` from as many tasks: Raft + sled without HTTP.
//! - `fdatasync 4 KiB`: one writer appending 4 KiB + fdatasync in the temp directory, to show
//!   what a disk sync costs on this machine.
//!
//! ```text
//! cargo bench --bench store -- [--writers 16,64,256] [--duration 10s] [--warmup 2s] [--soak]
//!                               [--no-redis] [--no-in-process] [--binary PATH] [--results DIR]
//! ```
//!
//! `cargo bench` builds the release binary it runs (`CARGO_BIN_EXE_mediamesh`). When
//! `redis-server` is missing, the bench installs it with apt-get if it runs as root, else it
//! prints how and leaves the Redis rows out. Results go to
//! `benches/results/store-<UTC>.{md,json}` and `store-latest.{md,json}`. All processes and
//! temporary directories are removed at the end, also when a step panics.

#[path = "../tests/common/cluster.rs"]
mod cluster;

#[path = "common/mod.rs"]
mod common;
use mediamesh_cluster::{NodeId, RoomId, Store, StoreConfig, ViewerId, ViewerState};
use serde_json::json;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Distinct keys each writer cycles through.
const KEYS_PER_WRITER: usize = 16;
/// Writer threads get small stacks: 256 of them run at once.
const WRITER_STACK_BYTES: usize = 256 * 1024;
/// Deadline of one operation in the bench clients.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
const CLUSTER_START_MAX: Duration = Duration::from_secs(30);
const REDIS_START_MAX: Duration = Duration::from_secs(10);
/// The aim from the store issue.
/// The aim from the store issue: p99 commit latency at [`AIM_WRITERS`] writers.
const AIM_P99_MS: f64 = 10.0;
/// Writers at which the latency aim holds.
const AIM_WRITERS: usize = 64;

#[derive(Debug, Clone)]
struct Args {
    writers: Vec<usize>,
    duration: Duration,
    warmup: Duration,
    redis: bool,
    in_process: bool,
    /// Run the soak (synthetic viewers through the real batcher) instead of the write points.
    soak: bool,
    /// Measure a restart with 500,000 viewers instead of the write points.
    restart: bool,
    binary: PathBuf,
    results_dir: PathBuf,
}

fn usage() -> &'static str {
    "cargo bench --bench store -- [--writers 16,64,256] [--soak] [--restart] [--duration 10s] [--warmup 2s] [--no-redis] \
     [--no-in-process] [--binary target/release/mediamesh] [--results benches/results]"
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| *n >= 0.0)
        .map(|n| Duration::from_secs_f64(n * scale))
        .ok_or_else(|| format!("{text:?} is not a duration like 10s or 500ms"))
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        writers: vec![16, 64, 256],
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        redis: true,
        in_process: true,
        soak: false,
        restart: false,
        binary: PathBuf::from(env!("CARGO_BIN_EXE_mediamesh")),
        results_dir: root.join("benches").join("results"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{}", usage()));
        match flag.as_str() {
            "--bench" => {} // cargo bench passes it to harness = false targets
            "--writers" => {
                args.writers = value()?
                    .split(',')
                    .map(|w| w.trim().parse::<usize>().ok().filter(|w| *w > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("--writers takes positive numbers like 1,16,256")?
            }
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--warmup" => args.warmup = parse_duration(&value()?)?,
            "--no-redis" => args.redis = false,
            "--no-in-process" => args.in_process = false,
            "--soak" => args.soak = true,
            "--restart" => args.restart = true,
            "--binary" => args.binary = PathBuf::from(value()?),
            "--results" => args.results_dir = PathBuf::from(value()?),
            "--help" | "-h" => return Err(usage().to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(args)
}

// ----- measurement -----

/// CPU use over the measured window, in cores: of the server processes and of this process
/// (the bench clients; for the in-process rows also the stores).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct CpuUse {
    server_cores: Option<f64>,
    bench_process_cores: f64,
}

struct CpuSampler {
    pids: Vec<u32>,
    at: Instant,
    server: f64,
    own: f64,
}

impl CpuSampler {
    fn start(pids: &[u32]) -> CpuSampler {
        CpuSampler {
            pids: pids.to_vec(),
            at: Instant::now(),
            server: pids.iter().map(|&p| common::process_cpu_seconds(p)).sum(),
            own: common::process_cpu_seconds(0),
        }
    }

    fn stop(self) -> CpuUse {
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-3);
        let server: f64 = self.pids.iter().map(|&p| common::process_cpu_seconds(p)).sum();
        CpuUse {
            server_cores: (!self.pids.is_empty()).then(|| (server - self.server) / elapsed),
            bench_process_cores: (common::process_cpu_seconds(0) - self.own) / elapsed,
        }
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// One measured point.
#[derive(Debug, Clone, serde::Serialize)]
struct Point {
    system: String,
    writers: usize,
    /// Operations acknowledged inside the measured window.
    ops: u64,
    /// Failed operations inside the window (not in the latencies).
    errors: u64,
    ops_per_second: f64,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
    cpu: CpuUse,
    first_error: Option<String>,
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    f64::from(sorted_us[((sorted_us.len() - 1) as f64 * p).round() as usize]) / 1000.0
}

/// What each writer brings back.
#[derive(Default)]
struct WriterTally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

impl WriterTally {
    /// Records one operation that ran from `t0` to `t1` if it lies inside the window.
    fn record(&mut self, t0: Instant, t1: Instant, window: (Instant, Instant), result: Result<(), String>) {
        if t0 < window.0 || t1 > window.1 {
            return;
        }
        match result {
            Ok(()) => self
                .latencies_us
                .push(u32::try_from(t1.duration_since(t0).as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

fn summarize(system: &str, writers: usize, measured: Duration, cpu: CpuUse, tallies: Vec<WriterTally>) -> Point {
    let errors = tallies.iter().map(|t| t.errors).sum();
    let first_error = tallies.iter().find_map(|t| t.first_error.clone());
    let mut all: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies_us).collect();
    all.sort_unstable();
    let point = Point {
        system: system.to_string(),
        writers,
        ops: all.len() as u64,
        errors,
        ops_per_second: all.len() as f64 / measured.as_secs_f64(),
        latency_ms_p50: percentile_ms(&all, 0.50),
        latency_ms_p99: percentile_ms(&all, 0.99),
        latency_ms_max: all.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        cpu,
        first_error,
    };
    println!(
        "  {:<26} {:>4} writers: {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  cpu server {} bench {:.2}  errors {}{}",
        point.system,
        point.writers,
        point.ops_per_second,
        point.latency_ms_p50,
        point.latency_ms_p99,
        point.latency_ms_max,
        point.cpu.server_cores.map_or("-".to_string(), |c| format!("{c:.2}")),
        point.cpu.bench_process_cores,
        point.errors,
        point
            .first_error
            .as_deref()
            .map(|e| format!(" (first: {e:.120})"))
            .unwrap_or_default()
    );
    point
}

/// Runs `writers` threads, each with its own connection made by `connect(writer)`, calling
/// `op(connection, writer, sequence)` back to back: `warmup`, then `duration` measured.
fn run_threads<C>(
    system: &str,
    writers: usize,
    warmup: Duration,
    duration: Duration,
    server_pids: &[u32],
    connect: impl Fn(usize) -> Result<C, String> + Sync,
    op: impl Fn(&mut C, usize, u64) -> Result<(), String> + Sync,
) -> Point {
    let barrier = Barrier::new(writers + 1);
    let start_slot = std::sync::OnceLock::new();
    let (tallies, cpu) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let (barrier, start_slot, connect, op) = (&barrier, &start_slot, &connect, &op);
                std::thread::Builder::new()
                    .stack_size(WRITER_STACK_BYTES)
                    .spawn_scoped(scope, move || {
                        let connection = connect(w);
                        barrier.wait();
                        let start: Instant = *start_slot.get().expect("set before the barrier opens");
                        let window = (start + warmup, start + warmup + duration);
                        let mut tally = WriterTally::default();
                        let mut connection = match connection {
                            Ok(c) => c,
                            Err(e) => {
                                tally.errors += 1;
                                tally.first_error = Some(format!("connect: {e}"));
                                return tally;
                            }
                        };
                        let mut sequence = 0u64;
                        loop {
                            let t0 = Instant::now();
                            if t0 >= window.1 {
                                break;
                            }
                            let result = op(&mut connection, w, sequence);
                            sequence += 1;
                            tally.record(t0, Instant::now(), window, result);
                        }
                        tally
                    })
                    .expect("spawn a writer thread")
            })
            .collect();
        let start = Instant::now();
        start_slot.set(start).expect("set once");
        barrier.wait();
        sleep_until(start + warmup);
        let sampler = CpuSampler::start(server_pids);
        sleep_until(start + warmup + duration);
        let cpu = sampler.stop();
        let tallies = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect::<Vec<_>>();
        (tallies, cpu)
    });
    summarize(system, writers, duration, cpu, tallies)
}

fn key(writer: usize, sequence: u64) -> String {
    format!("viewer-w{writer:03}-k{:02}", sequence as usize % KEYS_PER_WRITER)
}

/// The viewer state every system stores (as the HTTP body, and as the Redis value).
fn value(writer: usize, sequence: u64) -> String {
    json!({
        "room": format!("room-{:02}", writer % 32),
        "position_ms": sequence * 40,
        "subscriptions": ["camera", "microphone"],
        "layers": {"camera": "h"},
        "session": format!("session-w{writer:03}"),
    })
    .to_string()
}

// ----- mediamesh over HTTP -----

/// A minimal HTTP/1.1 keep-alive client: as cheap on the client side as the Redis one, so 256
/// writers on a 2-core machine measure the servers, not 256 HTTP client runtimes.
struct HttpConnection {
    reader: BufReader<TcpStream>,
    host: String,
    token: String,
}

impl HttpConnection {
    fn connect(addr: &str, token: &str) -> Result<HttpConnection, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(OP_TIMEOUT)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(OP_TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(HttpConnection {
            reader: BufReader::new(stream),
            host: addr.to_string(),
            token: token.to_string(),
        })
    }

    /// Sends a PUT with a JSON body; returns the status and body.
    fn put(&mut self, path: &str, body: &str) -> Result<(u16, Vec<u8>), String> {
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            self.token,
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err("chunked answers are not supported by this client".into());
                }
            }
        }
        let mut body = vec![0; length.ok_or("answer without content-length")?];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        Ok((status, body))
    }
}

fn bench_mediamesh_http(args: &Args, points: &mut Vec<Point>) {
    println!("mediamesh http: starting three nodes ({})", args.binary.display());
    let cluster = cluster::ProcessCluster::start(
        &args.binary,
        &[("seoul-1", "seoul"), ("seoul-2", "seoul"), ("busan-1", "busan")],
        &[],
        CLUSTER_START_MAX,
    );
    let addrs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.spec.http_port))
        .collect();
    let token = cluster.admin_token.clone();
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    for &writers in &args.writers {
        let point = run_threads(
            "mediamesh http",
            writers,
            args.warmup,
            args.duration,
            &pids,
            |w| HttpConnection::connect(&addrs[w % addrs.len()], &token),
            |connection, w, sequence| {
                let (status, body) =
                    connection.put(&format!("/admin/v1/viewers/{}", key(w, sequence)), &value(w, sequence))?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!("{status} {}", String::from_utf8_lossy(&body)))
                }
            },
        );
        points.push(point);
    }
    match cluster.wait_converged(Instant::now() + Duration::from_secs(10)) {
        Ok((applied, digest)) => println!("  nodes converged: applied index {applied}, digest {digest:.16}"),
        Err(e) => println!("  WARNING: nodes did not converge after the run: {e}"),
    }
    // Dropping the cluster kills the nodes and removes their data directories.
}

// ----- Redis -----

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// `redis-server`, installed with apt-get when missing and running as root.
fn redis_server() -> Option<PathBuf> {
    if let Some(path) = find_in_path("redis-server") {
        return Some(path);
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || find_in_path("apt-get").is_none() {
        println!(
            "redis-server is missing: install it with `sudo apt-get install -y redis-server` to get the Redis rows"
        );
        return None;
    }
    println!("redis-server is missing: installing it with apt-get");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "redis-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .status();
        if !install() {
            println!("apt-get install redis-server failed; the Redis rows are left out");
            return None;
        }
    }
    // The package starts a system instance on 6379; this bench uses its own instances.
    find_in_path("redis-server")
}

/// A `redis-server` child on a loopback port with its own directory; killed and removed on drop.
struct RedisServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl RedisServer {
    fn start(binary: &Path, appendfsync: &str) -> Result<RedisServer, String> {
        let dir = std::env::temp_dir().join(format!("mediamesh-bench-redis-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(&dir)
            .args(["--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no", "--maxclients", "1024"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        let server = RedisServer { child, dir, port };
        let deadline = Instant::now() + REDIS_START_MAX;
        loop {
            if let Ok(mut connection) = RedisConnection::connect(port)
                && connection.command(&["PING"]).is_ok_and(|r| r == "+PONG")
            {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err(format!("redis-server on {port} did not answer PING in time"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct RedisConnection {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl RedisConnection {
    fn connect(port: u16) -> Result<RedisConnection, String> {
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(OP_TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(RedisConnection {
            reader: BufReader::new(stream),
            request: Vec::with_capacity(512),
        })
    }

    /// Sends one command as a RESP array of bulk strings; returns the one-line reply.
    fn command(&mut self, parts: &[&str]) -> Result<String, String> {
        self.request.clear();
        let _ = write!(self.request, "*{}\r\n", parts.len());
        for part in parts {
            let _ = write!(self.request, "${}\r\n{part}\r\n", part.len());
        }
        self.reader
            .get_mut()
            .write_all(&self.request)
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        Ok(line.trim_end().to_string())
    }
}

fn bench_redis(args: &Args, binary: &Path, appendfsync: &str, points: &mut Vec<Point>) {
    let system = format!("redis {appendfsync}");
    for &writers in &args.writers {
        // A fresh server per point, so the AOF of one point does not slow the next.
        let server = match RedisServer::start(binary, appendfsync) {
            Ok(s) => s,
            Err(e) => {
                println!("  {system}: {e}");
                return;
            }
        };
        let point = run_threads(
            &system,
            writers,
            args.warmup,
            args.duration,
            &[server.child.id()],
            |_| RedisConnection::connect(server.port),
            |connection, w, sequence| {
                let reply = connection.command(&["SET", &key(w, sequence), &value(w, sequence), "EX", "300"])?;
                if reply == "+OK" { Ok(()) } else { Err(reply) }
            },
        );
        points.push(point);
    }
}

// ----- the store in this process -----

/// Removes a temporary directory when dropped (also on panic).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh temporary root for in-process replicas (removed with the guard) and a runtime.
fn in_process_setup(what: &str) -> (PathBuf, RemoveOnDrop, tokio::runtime::Runtime) {
    let root = std::env::temp_dir().join(format!("mediamesh-bench-{what}-{}", uuid::Uuid::now_v7()));
    let cleanup = RemoveOnDrop(root.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    (root, cleanup, runtime)
}

/// The store in this process: `nodes` replicas (the node's configuration but for the viewer
/// batch window), written through `Store::upsert_viewer` by as many tasks as writers.
fn bench_store_in_process(args: &Args, system: &str, nodes: usize, viewer_batch_ms: u64, points: &mut Vec<Point>) {
    let (root, _cleanup, runtime) = in_process_setup("store");
    let secret = "bench-in-process-secret";
    let names = ["seoul-1", "seoul-2", "busan-1"];
    let stores: Vec<Store> = runtime.block_on(async {
        let mut stores: Vec<Store> = Vec::new();
        for (i, name) in names.iter().take(nodes).enumerate() {
            // The node's configuration is the library defaults (see src/node.rs).
            let mut config = StoreConfig::new(*name, root.join(name), secret);
            config.viewer_batch_ms = viewer_batch_ms;
            if i > 0 {
                config.join = vec![stores[0].advertise_cluster().to_string()];
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
            let store = mediamesh_cluster::server::start(config, listener, std::future::pending())
                .await
                .expect("store starts");
            stores.push(store);
        }
        for store in &stores {
            tokio::time::timeout(CLUSTER_START_MAX, store.wait_ready())
                .await
                .expect("ready in time")
                .expect("ready");
        }
        let deadline = Instant::now() + CLUSTER_START_MAX;
        loop {
            let status = stores[0].status();
            if status.nodes.len() == nodes
                && status
                    .nodes
                    .iter()
                    .all(|n| n.membership == mediamesh_cluster::Membership::Voter)
            {
                break;
            }
            assert!(Instant::now() < deadline, "{system}: no {nodes} voters in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stores
    });
    for &writers in &args.writers {
        let (tallies, cpu) = runtime.block_on(async {
            let start = Instant::now();
            let window = (start + args.warmup, start + args.warmup + args.duration);
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let store = stores[w % stores.len()].clone();
                    tokio::spawn(async move {
                        let mut tally = WriterTally::default();
                        let mut sequence = 0u64;
                        loop {
                            let t0 = Instant::now();
                            if t0 >= window.1 {
                                break;
                            }
                            let state = ViewerState {
                                viewer: ViewerId(key(w, sequence)),
                                room: RoomId(format!("room-{:02}", w % 32)),
                                node: NodeId(store.node_id().0.clone()),
                                session: format!("session-w{w:03}"),
                                display_name: String::new(),
                                position_ms: sequence * 40,
                                subscriptions: vec!["camera".into(), "microphone".into()],
                                layers: [("camera".to_string(), "h".to_string())].into(),
                                updated_at_ms: 0,
                                expires_at_ms: 0,
                                revision: 0,
                                generation: 0,
                            };
                            let result = store.upsert_viewer(state).await.map(|_| ()).map_err(|e| e.to_string());
                            sequence += 1;
                            tally.record(t0, Instant::now(), window, result);
                        }
                        tally
                    })
                })
                .collect();
            tokio::time::sleep_until(window.0.into()).await;
            let sampler = CpuSampler::start(&[]);
            tokio::time::sleep_until(window.1.into()).await;
            let cpu = sampler.stop();
            let mut tallies = Vec::new();
            for task in tasks {
                tallies.push(task.await.expect("writer task"));
            }
            (tallies, cpu)
        });
        points.push(summarize(system, writers, args.duration, cpu, tallies));
    }
    runtime.block_on(async {
        for store in &stores {
            store.shutdown();
        }
        for store in &stores {
            let _ = tokio::time::timeout(Duration::from_secs(10), store.closed()).await;
        }
    });
}

/// One writer appending 4 KiB and calling fdatasync, for `duration`: the disk's sync cost.
fn bench_fdatasync(args: &Args, points: &mut Vec<Point>) {
    use std::os::unix::io::AsRawFd;
    let path = std::env::temp_dir().join(format!("mediamesh-bench-sync-{}", uuid::Uuid::now_v7()));
    let mut file = match std::fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => {
            println!("  fdatasync: cannot create {}: {e}", path.display());
            return;
        }
    };
    let block = vec![0x5au8; 4096];
    let mut tally = WriterTally::default();
    let start = Instant::now();
    let window = (start, start + args.duration.min(Duration::from_secs(5)));
    while Instant::now() < window.1 {
        let t0 = Instant::now();
        let result = file.write_all(&block).map_err(|e| e.to_string()).and_then(|_| {
            // SAFETY: fdatasync on a descriptor this function owns; no memory is touched.
            match unsafe { libc::fdatasync(file.as_raw_fd()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error().to_string()),
            }
        });
        tally.record(t0, Instant::now(), window, result);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    points.push(summarize(
        "fdatasync 4 KiB",
        1,
        window.1 - window.0,
        CpuUse::default(),
        vec![tally],
    ));
}

// ----- the report -----

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[derive(Debug, serde::Serialize)]
struct Machine {
    cpu_model: String,
    cores: usize,
    ram_gib: f64,
    kernel: String,
    temp_dir: String,
    temp_dir_filesystem: String,
    load_average_at_start: String,
}

fn machine() -> Machine {
    let facts = common::machine_facts();
    let temp_dir = std::env::temp_dir();
    Machine {
        cpu_model: facts.cpu_model,
        cores: facts.cores,
        ram_gib: facts.memory_gib,
        kernel: command_output("uname", &["-sr"]).unwrap_or_default(),
        temp_dir: temp_dir.display().to_string(),
        temp_dir_filesystem: command_output("stat", &["-f", "-c", "%T", &temp_dir.display().to_string()])
            .unwrap_or_default(),
        load_average_at_start: common::load_average(),
    }
}

fn utc_stamp(now: SystemTime) -> (String, String) {
    let ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let iso = mediamesh::clock::rfc3339_ms(ms);
    // 2026-11-21T13:26:29.924Z → 20261121T132629Z
    let compact: String = iso
        .chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect::<String>()
        + "Z";
    (iso, compact)
}

/// The commit the node and store code of this run come from (`-dirty` with uncommitted changes).
fn bench_commit() -> String {
    common::git_commit(&["src", "cluster", "benches/store.rs"])
}

/// Writes a report's results and prints its Markdown.
fn publish(args: &Args, name: &str, stamp: &str, md: &str, json: &serde_json::Value) {
    match common::write_results(&args.results_dir, name, stamp, md, json) {
        Ok(_) => println!("\n{md}"),
        Err(e) => eprintln!("cannot write the results to {}: {e}", args.results_dir.display()),
    }
}

/// A report's title, machine and commit lines.
fn report_header(title: &str, date: &str, machine: &Machine, commit: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {title} — {date}\n");
    let _ = writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM, {}; load average at start {}",
        machine.cpu_model, machine.cores, machine.ram_gib, machine.kernel, machine.load_average_at_start
    );
    let _ = writeln!(md, "- git commit: {commit}");
    md
}

fn write_report(args: &Args, started: SystemTime, machine: &Machine, redis_version: Option<String>, points: &[Point]) {
    let (date, stamp) = utc_stamp(started);
    let commit = bench_commit();
    let find = |system: &str, writers: usize| points.iter().find(|p| p.system == system && p.writers == writers);

    let mut md = String::new();
    let _ = writeln!(md, "# Store benchmark — {date}\n");
    let _ = writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM, {}",
        machine.cpu_model, machine.cores, machine.ram_gib, machine.kernel
    );
    let _ = writeln!(
        md,
        "- temp dir (data directories, AOF): {} on {}; load average at start {}",
        machine.temp_dir, machine.temp_dir_filesystem, machine.load_average_at_start
    );
    let _ = writeln!(md, "- git commit: {commit}");
    let _ = writeln!(md, "- redis: {}", redis_version.as_deref().unwrap_or("not run"));
    let _ = writeln!(
        md,
        "- parameters: writers {:?}, {:.0} s warm-up + {:.0} s measured per point, {KEYS_PER_WRITER} keys per writer, \
         value = the viewer JSON (~{} bytes)",
        args.writers,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        value(0, 0).len()
    );
    let _ = writeln!(
        md,
        "- mediamesh: 3 node processes (release), `PUT /admin/v1/viewers/{{id}}` over one keep-alive HTTP/1.1 connection \
         per writer, writers round-robin over the nodes; answered after the Raft commit, entries flushed (sled) on a \
         majority before they commit"
    );
    let _ = writeln!(
        md,
        "- redis: `redis-server --appendonly yes --appendfsync <mode> --save \"\"`, `SET key value EX 300`, one RESP \
         connection per writer, a fresh server per point\n"
    );
    let _ = writeln!(
        md,
        "| system | writers | ops/s | p50 ms | p99 ms | max ms | errors | server CPU (cores) | bench process CPU (cores) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in points {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} |",
            p.system,
            p.writers,
            p.ops_per_second,
            p.latency_ms_p50,
            p.latency_ms_p99,
            p.latency_ms_max,
            p.errors,
            p.cpu.server_cores.map_or("-".to_string(), |c| format!("{c:.2}")),
            p.cpu.bench_process_cores
        );
    }
    let _ = writeln!(md);
    if let Some(e) = points.iter().find_map(|p| p.first_error.as_ref().map(|e| (p, e))) {
        let _ = writeln!(
            md,
            "First error ({} at {} writers): `{:.300}`\n",
            e.0.system, e.0.writers, e.1
        );
    }
    let top = args.writers.iter().copied().max().unwrap_or(0);
    if let (Some(ours), Some(redis)) = (find("mediamesh http", top), find("redis everysec", top)) {
        let throughput_ok = ours.ops_per_second >= redis.ops_per_second;
        let _ = writeln!(
            md,
            "Aim at {top} writers: throughput ≥ Redis everysec ({:.0} vs {:.0} ops/s: {}).",
            ours.ops_per_second,
            redis.ops_per_second,
            if throughput_ok { "met" } else { "NOT met" },
        );
    }
    for &writers in &args.writers {
        if let (Some(ours), Some(redis)) = (find("mediamesh http", writers), find("redis everysec", writers)) {
            let _ = writeln!(
                md,
                "- {writers} writers: mediamesh {:.0} ops/s = {:.0} % of Redis everysec ({:.0}){}",
                ours.ops_per_second,
                100.0 * ours.ops_per_second / redis.ops_per_second.max(1.0),
                redis.ops_per_second,
                if writers == AIM_WRITERS {
                    format!(
                        "; p99 {:.2} ms (aim ≤ {AIM_P99_MS} ms: {})",
                        ours.latency_ms_p99,
                        if ours.latency_ms_p99 <= AIM_P99_MS {
                            "met"
                        } else {
                            "NOT met"
                        }
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    let _ = writeln!(
        md,
        "\nSee benches/README.md (\"store\") for what the numbers mean and where the time goes."
    );

    let report = json!({
        "benchmark": "store",
        "date": date,
        "git_commit": commit,
        "machine": machine,
        "redis_version": redis_version,
        "parameters": {
            "writers": args.writers,
            "warmup_s": args.warmup.as_secs_f64(),
            "duration_s": args.duration.as_secs_f64(),
            "keys_per_writer": KEYS_PER_WRITER,
            "value_bytes": value(0, 0).len(),
        },
        "points": points,
    });
    if let Err(e) = common::write_results(&args.results_dir, "store", &stamp, &md, &report) {
        eprintln!("cannot write the results to {}: {e}", args.results_dir.display());
        return;
    }
    println!("\n{md}");
    println!(
        "store: results written to {}/store-{stamp}.{{md,json}} and store-latest.{{md,json}}",
        args.results_dir.display()
    );
}

// ----- restart -----

/// Viewers in the state when a replica restarts.
const RESTART_VIEWERS: usize = 500_000;
/// Writer tasks filling the state.
const RESTART_WRITERS: usize = 2_048;

/// Three in-process replicas fill the state with [`RESTART_VIEWERS`] viewers; a follower stops
/// and starts again on its data directory. Measured: until `server::start` returns (sled opened,
/// the snapshot decoded), until it is ready (a leader known, registered), and until it has
/// applied everything the leader had committed when it stopped (the log after the snapshot
/// applied again, and what it missed while down).
fn bench_restart(args: &Args, started: SystemTime, machine: &Machine) {
    let (root, _cleanup, runtime) = in_process_setup("restart");
    let secret = "bench-restart-secret";
    let names = ["seoul-1", "seoul-2", "busan-1"];
    let config_of = |i: usize, join: Vec<String>| {
        let mut config = StoreConfig::new(names[i], root.join(names[i]), secret);
        config.join = join;
        config
    };
    let report = runtime.block_on(async {
        let mut stores: Vec<Store> = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..3 {
            let join = if i > 0 {
                vec![stores[0].advertise_cluster().to_string()]
            } else {
                Vec::new()
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
            addrs.push(listener.local_addr().expect("address"));
            let store = mediamesh_cluster::server::start(config_of(i, join), listener, std::future::pending())
                .await
                .expect("store starts");
            stores.push(store);
        }
        for store in &stores {
            tokio::time::timeout(CLUSTER_START_MAX, store.wait_ready())
                .await
                .expect("ready in time")
                .expect("ready");
        }
        println!("restart: filling the state with {RESTART_VIEWERS} viewers");
        let fill_started = Instant::now();
        let tasks: Vec<_> = (0..RESTART_WRITERS)
            .map(|w| {
                let store = stores[w % 3].clone();
                tokio::spawn(async move {
                    let mut i = w;
                    while i < RESTART_VIEWERS {
                        let state = ViewerState {
                            viewer: ViewerId(format!("viewer-{i:07}")),
                            room: RoomId(format!("room-{:03}", i % 500)),
                            node: NodeId(store.node_id().0.clone()),
                            session: format!("session-{i:07}"),
                            display_name: String::new(),
                            position_ms: i as u64 * 40,
                            subscriptions: vec!["camera".into(), "microphone".into()],
                            layers: [("camera".to_string(), "h".to_string())].into(),
                            updated_at_ms: 0,
                            expires_at_ms: 0,
                            revision: 0,
                            generation: 1,
                        };
                        if store.upsert_viewer(state).await.is_ok() {
                            i += RESTART_WRITERS;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task");
        }
        let fill_s = fill_started.elapsed().as_secs_f64();
        let leader_status = stores[0].status();
        let target = leader_status.commit_index;
        // Let the follower apply everything before it stops, so what it replays is its own log.
        let follower = 2;
        while stores[follower].status().applied_index < target {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = stores[follower].status();
        println!(
            "restart: filled in {fill_s:.1} s; {} viewers, applied {}, snapshot at {}",
            before.viewers, before.applied_index, before.snapshot_index
        );
        stores[follower].shutdown();
        stores[follower].closed().await;
        let data_bytes: u64 = walk_bytes(&root.join(names[follower]));
        let t0 = Instant::now();
        let listener = tokio::net::TcpListener::bind(addrs[follower])
            .await
            .expect("the follower's port is free again");
        let restarted =
            mediamesh_cluster::server::start(config_of(follower, Vec::new()), listener, std::future::pending())
                .await
                .expect("the follower restarts");
        let open_s = t0.elapsed().as_secs_f64();
        restarted.wait_ready().await.expect("ready");
        let ready_s = t0.elapsed().as_secs_f64();
        let target = stores[0].status().commit_index;
        loop {
            let s = restarted.status();
            if s.applied_index >= target && s.viewers as usize >= RESTART_VIEWERS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let caught_up_s = t0.elapsed().as_secs_f64();
        let after = restarted.status();
        for store in stores.iter().chain(std::iter::once(&restarted)) {
            store.shutdown();
        }
        json!({
            "viewers": after.viewers,
            "fill_s": fill_s,
            "fill_updates_per_s": RESTART_VIEWERS as f64 / fill_s,
            "data_dir_bytes": data_bytes,
            "snapshot_index": before.snapshot_index,
            "applied_index": before.applied_index,
            "entries_after_snapshot": before.applied_index - before.snapshot_index,
            "open_s": open_s,
            "ready_s": ready_s,
            "caught_up_s": caught_up_s,
        })
    });
    let (date, stamp) = utc_stamp(started);
    let commit = bench_commit();
    let mut md = report_header(
        &format!("Store restart with {RESTART_VIEWERS} viewers"),
        &date,
        machine,
        &commit,
    );
    let _ = writeln!(
        md,
        "- three in-process replicas (the node's store defaults), filled through `Store::upsert_viewer` by \
         {RESTART_WRITERS} tasks ({:.0} viewers/s); then a follower stops and starts again on its data directory \
         ({:.1} MB: the log after the snapshot at index {}, {} entries, and the snapshot)\n",
        report["fill_updates_per_s"].as_f64().unwrap_or(0.0),
        report["data_dir_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        report["snapshot_index"],
        report["entries_after_snapshot"]
    );
    let _ = writeln!(md, "| step | seconds after the restart |");
    let _ = writeln!(md, "|---|---:|");
    let _ = writeln!(
        md,
        "| `server::start` returned (sled opened, snapshot decoded) | {:.2} |",
        report["open_s"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        md,
        "| ready (leader known, registered) | {:.2} |",
        report["ready_s"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        md,
        "| caught up ({} viewers, everything the leader had committed applied) | {:.2} |",
        report["viewers"],
        report["caught_up_s"].as_f64().unwrap_or(0.0)
    );
    let json = json!({
        "benchmark": "store-restart",
        "date": date,
        "git_commit": commit,
        "machine": machine,
        "result": report,
    });
    publish(args, "store-restart", &stamp, &md, &json);
}

/// Bytes of the files under `dir`.
fn walk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ----- soak -----

/// Synthetic viewers of the soak, over the three nodes.
const SOAK_VIEWERS: usize = 200_000;
/// Each reports its position this often.
const SOAK_REPORT_MS: u64 = 2_000;
/// Not measured first.
const SOAK_WARMUP_MS: u64 = 5_000;
/// Measured.
const SOAK_DURATION_MS: u64 = 60_000;
/// The aim: commit p99 at most this.
const SOAK_AIM_P99_MS: f64 = 50.0;

/// Three node processes, each driving a third of [`SOAK_VIEWERS`] synthetic viewers through its
/// own viewer batcher (`--synthetic-viewers`, what signal sessions use; no HTTP); each writes
/// a summary, collected here.
fn bench_soak(args: &Args, started: SystemTime, machine: &Machine) {
    let per_node = SOAK_VIEWERS / 3;
    println!(
        "soak: 3 nodes × {per_node} synthetic viewers, a report every {SOAK_REPORT_MS} ms ({} updates/s offered), \
         {SOAK_WARMUP_MS} ms warm-up + {SOAK_DURATION_MS} ms measured",
        SOAK_VIEWERS as u64 * 1000 / SOAK_REPORT_MS
    );
    let viewers = per_node.to_string();
    let report = SOAK_REPORT_MS.to_string();
    let warmup = SOAK_WARMUP_MS.to_string();
    let duration = SOAK_DURATION_MS.to_string();
    let cluster = cluster::ProcessCluster::start(
        &args.binary,
        &[("seoul-1", "seoul"), ("seoul-2", "seoul"), ("busan-1", "busan")],
        &[
            "--synthetic-viewers",
            &viewers,
            "--synthetic-report-ms",
            &report,
            "--synthetic-warmup-ms",
            &warmup,
            "--synthetic-duration-ms",
            &duration,
            "--synthetic-out",
            "synthetic.json",
        ],
        CLUSTER_START_MAX,
    );
    let deadline = Instant::now() + Duration::from_millis(SOAK_WARMUP_MS + SOAK_DURATION_MS) + Duration::from_secs(90);
    let mut summaries = Vec::new();
    for node in &cluster.nodes {
        let path = node.data_dir.join("synthetic.json");
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
            {
                summaries.push(value);
                break;
            }
            if Instant::now() > deadline {
                eprintln!("soak: {} wrote no summary; its log:", node.spec.id);
                for line in cluster.log_tail(cluster.index_of(&node.spec.id).unwrap_or(0), 20) {
                    eprintln!("  {line}");
                }
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let converged = cluster.wait_converged(Instant::now() + Duration::from_secs(30));
    let total = |key: &str| summaries.iter().map(|s| s[key].as_u64().unwrap_or(0)).sum::<u64>();
    let (offered, committed, failed, skipped) =
        (total("offered"), total("committed"), total("failed"), total("skipped"));
    let p99_max = summaries
        .iter()
        .map(|s| s["commit_ms"]["p99"].as_f64().unwrap_or(f64::MAX))
        .fold(0.0, f64::max);
    let (date, stamp) = utc_stamp(started);
    let commit = bench_commit();
    let mut md = report_header("Store soak", &date, machine, &commit);
    let _ = writeln!(
        md,
        "- 3 node processes (release), {per_node} synthetic viewers each (`--synthetic-viewers`), one state write per viewer \
         every {SOAK_REPORT_MS} ms through the node's viewer batcher (`Store::upsert_viewer`), {:.0} updates/s offered; \
         {} s warm-up, {} s measured\n",
        SOAK_VIEWERS as f64 * 1000.0 / SOAK_REPORT_MS as f64,
        SOAK_WARMUP_MS / 1000,
        SOAK_DURATION_MS / 1000
    );
    let _ = writeln!(
        md,
        "| node | offered | committed | failed | not offered (cap) | commit p50 ms | p99 ms | max ms | CPU (cores) | RSS MiB |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &summaries {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            s["node"].as_str().unwrap_or("?"),
            s["offered"],
            s["committed"],
            s["failed"],
            s["skipped"],
            s["commit_ms"]["p50"].as_f64().unwrap_or(0.0),
            s["commit_ms"]["p99"].as_f64().unwrap_or(0.0),
            s["commit_ms"]["max"].as_f64().unwrap_or(0.0),
            s["cpu_cores"].as_f64().unwrap_or(0.0),
            s["rss_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
        );
    }
    let seconds = SOAK_DURATION_MS as f64 / 1000.0;
    let _ = writeln!(
        md,
        "\nCommitted {:.0} updates/s of {:.0} offered ({committed} of {offered}; {failed} failed, {skipped} not offered \
         because {} writes were in flight on a node). Every update committed: {}. Commit p99 (worst node) {p99_max:.2} ms, \
         aim ≤ {SOAK_AIM_P99_MS} ms: {}. Replicas converged after the run: {}.",
        committed as f64 / seconds,
        (offered + skipped) as f64 / seconds,
        mediamesh::synthetic::SYNTHETIC_IN_FLIGHT_MAX,
        if failed == 0 && skipped == 0 && committed == offered {
            "yes"
        } else {
            "NO"
        },
        if p99_max <= SOAK_AIM_P99_MS { "met" } else { "NOT met" },
        match &converged {
            Ok((applied, digest)) => format!("yes (applied index {applied}, digest {digest:.16})"),
            Err(e) => format!("NO ({e})"),
        }
    );
    let report = json!({
        "benchmark": "store-soak",
        "date": date,
        "git_commit": commit,
        "machine": machine,
        "parameters": {
            "viewers": SOAK_VIEWERS,
            "report_ms": SOAK_REPORT_MS,
            "warmup_ms": SOAK_WARMUP_MS,
            "duration_ms": SOAK_DURATION_MS,
        },
        "nodes": summaries,
    });
    publish(args, "store-soak", &stamp, &md, &report);
}

fn main() {
    let args = common::args_or_exit(parse_args());
    common::require_binary(&args.binary);
    let started = SystemTime::now();
    let machine = machine();
    if args.soak {
        bench_soak(&args, started, &machine);
        return;
    }
    if args.restart {
        bench_restart(&args, started, &machine);
        return;
    }
    println!(
        "store benchmark: writers {:?}, warm-up {:?}, measured {:?} per point; {} × {} cores",
        args.writers, args.warmup, args.duration, machine.cpu_model, machine.cores
    );
    let mut points = Vec::new();
    bench_mediamesh_http(&args, &mut points);
    let mut redis_version = None;
    if args.redis
        && let Some(redis) = redis_server()
    {
        redis_version = command_output(&redis.display().to_string(), &["--version"]);
        bench_redis(&args, &redis, "everysec", &mut points);
        bench_redis(&args, &redis, "always", &mut points);
    }
    if args.in_process {
        // Where the time goes: Raft + sled without HTTP (the node's settings), then without the
        // 5 ms viewer batch window, then one replica (no replication round trip).
        bench_store_in_process(&args, "store in-process", 3, 5, &mut points);
        bench_store_in_process(&args, "store in-process, window 0", 3, 0, &mut points);
        bench_store_in_process(&args, "store 1 replica, window 0", 1, 0, &mut points);
    }
    bench_fdatasync(&args, &mut points);
    write_report(&args, started, &machine, redis_version, &points);
}
