//! Fan-out benchmark: one publisher (VP8 ~1.5 Mb/s @ 30 fps + Opus) and N WHEP subscribers on
//! one node pinned to one core; the clients run in this process, pinned to another core.
//!
//! ```text
//! cargo build --release -p mediamesh
//! cargo bench --bench fanout -- [--subscribers 50,100,200,400] [--duration 20s] [--warmup 5s]
//! ```
//!
//! It does not build the node: it runs `target/release/mediamesh` and stops with a message when
//! that binary is missing. Results go to `benches/results/fanout-<UTC>.{md,json}` and
//! `fanout-latest.{md,json}`. See `benches/README.md` for what each column means.

#[path = "common/mod.rs"]
mod common;
use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use mediamesh_sdk::{ConnectOptions, PlayOptions, PlaySession, PublishOptions, PublishSession};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const API_SECRET: &str = "fanout-bench-secret-0123456789";
const ROOM: &str = "fanout";
/// How long the node gets to answer /healthz after it starts.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a subscriber gets to show its first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// Client CPU above this share of its core means the client may be the bottleneck.
const CLIENT_SATURATED_CORES: f64 = 0.90;
/// Media ports given to the node: enough for the largest N plus room for ports others hold.
const MEDIA_PORT_SPAN: u16 = 1_000;

#[derive(Debug, Clone)]
struct Args {
    subscribers: Vec<usize>,
    duration: Duration,
    warmup: Duration,
    node_core: usize,
    client_core: usize,
    loss_limit_percent: f64,
    nack: bool,
    connect_concurrency: usize,
    media_port_min: u16,
    binary: PathBuf,
    results_dir: PathBuf,
    /// Telemetry settings to run each N with: `on` (the default node) and/or `off` (`--traces off`).
    telemetry: Vec<String>,
}

fn usage() -> &'static str {
    "cargo bench --bench fanout -- [--subscribers 50,100,200,400] [--duration 20s] [--warmup 5s] [--telemetry on,off]\n\
     \x20   [--node-core 0] [--client-core 1] [--loss-limit 5] [--nack] [--connect-concurrency 8]\n\
     \x20   [--media-port-min 41000] [--binary target/release/mediamesh] [--results benches/results]"
}

fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 20s"))?;
    let seconds = match unit {
        "ms" => value / 1_000.0,
        "s" => value,
        "m" => value * 60.0,
        other => bail!("unknown duration unit {other:?} in {text:?} (ms, s, m)"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_args() -> Result<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut args = Args {
        subscribers: vec![50, 100, 200, 400],
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(5),
        node_core: 0,
        client_core: 1,
        loss_limit_percent: 5.0,
        nack: false,
        connect_concurrency: 8,
        media_port_min: 41_000,
        binary: target.join("release").join("mediamesh"),
        results_dir: root.join("benches").join("results"),
        telemetry: vec!["on".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value\n{}", usage()));
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--subscribers" => {
                args.subscribers = value()?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<usize>()
                            .context("--subscribers takes numbers like 50,100")
                    })
                    .collect::<Result<_>>()?;
            }
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--warmup" => args.warmup = parse_duration(&value()?)?,
            "--node-core" => args.node_core = value()?.parse()?,
            "--client-core" => args.client_core = value()?.parse()?,
            "--loss-limit" => args.loss_limit_percent = value()?.parse()?,
            "--nack" => args.nack = true,
            "--connect-concurrency" => args.connect_concurrency = value()?.parse::<usize>()?.max(1),
            "--media-port-min" => args.media_port_min = value()?.parse()?,
            "--binary" => args.binary = PathBuf::from(value()?),
            "--results" => args.results_dir = PathBuf::from(value()?),
            "--telemetry" => {
                args.telemetry = value()?.split(',').map(|t| t.trim().to_string()).collect();
                if args.telemetry.is_empty() || args.telemetry.iter().any(|t| t != "on" && t != "off") {
                    bail!("--telemetry takes on, off or on,off");
                }
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if args.subscribers.is_empty() || args.subscribers.contains(&0) {
        bail!("--subscribers needs positive counts");
    }
    let largest = *args.subscribers.iter().max().expect("checked non-empty above");
    if largest + 2 > usize::from(MEDIA_PORT_SPAN) {
        bail!("at most {} subscribers fit the media port range", MEDIA_PORT_SPAN - 2);
    }
    if args.node_core == args.client_core {
        bail!("--node-core and --client-core must differ");
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.binary.is_file() {
        bail!(
            "{} not found: build the node first with `cargo build --release -p mediamesh` \
             (the benchmark measures that binary and does not build it)",
            args.binary.display()
        );
    }
    warn_if_stale(&args.binary);
    if Command::new("taskset").arg("-V").output().is_err() {
        bail!("taskset (util-linux) is needed to pin the node to one core");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if args.node_core.max(args.client_core) >= cores {
        bail!("this machine has {cores} cores; choose --node-core and --client-core below that");
    }
    // Pin before any thread exists: every thread started later (runtime, blocking pool)
    // inherits the mask.
    pin_current_thread(args.client_core)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        tokio::select! {
            result = run(&args) => result,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: stopping the node");
                // Dropping `run` drops its NodeProcess, which kills the node.
                Err(anyhow!("interrupted"))
            }
        }
    })
}

fn pin_current_thread(core: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads it for the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity to core {core}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Says so when sources are newer than the binary: the numbers would be of older code.
fn warn_if_stale(binary: &Path) {
    let Ok(built) = binary.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = ["src", "actors/src", "cluster/src", "proto"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(t, _)| modified > *t)
            {
                newest = Some((modified, path));
            }
        }
    }
    if let Some((modified, path)) = newest
        && modified > built
    {
        eprintln!(
            "warning: {} is newer than {}; run `cargo build --release -p mediamesh` to measure current code",
            path.display(),
            binary.display()
        );
    }
}

/// The node under test. Killed on drop (normal end, error, panic, Ctrl-C), and by the kernel
/// if this process dies first (PR_SET_PDEATHSIG).
struct NodeProcess {
    child: Child,
    pid: u32,
    http: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid; at worst it already exited.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl NodeProcess {
    fn start(args: &Args, label: &str, telemetry: &str) -> Result<Self> {
        let http: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port()?).parse()?;
        let data_dir = std::env::temp_dir().join(format!("mediamesh-fanout-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        let log_path = data_dir.join("node.log");
        let log = std::fs::File::create(&log_path)?;
        let media_ports = format!("{}-{}", args.media_port_min, args.media_port_min + MEDIA_PORT_SPAN - 1);
        let sessions = (MEDIA_PORT_SPAN - 1).to_string();
        let mut command = Command::new("taskset");
        command
            .arg("-c")
            .arg(args.node_core.to_string())
            .arg(&args.binary)
            .arg("node")
            .args(["--node-id", "bench-1"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--http", &http.to_string()])
            .args(["--grpc", &format!("127.0.0.1:{}", common::free_tcp_port()?)])
            .args(["--cluster", &format!("127.0.0.1:{}", common::free_tcp_port()?)])
            .args(["--turn", "off"]) // fan-out only; its media ports overlap the default relay range
            .args(["--advertise", "127.0.0.1"])
            .args(["--media-ports", &media_ports])
            .args(["--api-secret", API_SECRET])
            .args(["--sessions-per-node-max", &sessions])
            .args(["--subscribers-per-room-max", &sessions])
            .args(["--traces", telemetry])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only marks this (pre-exec) child. taskset execs
        // the node in place, so the mark carries over to it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("starting the node under taskset")?;
        let pid = child.id();
        Ok(Self {
            child,
            pid,
            http,
            data_dir,
            log_path,
        })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<()> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let url = format!("{}/healthz", self.base_url());
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the node exited with {status} during start-up:\n{}", self.log_tail());
            }
            if let Ok(response) = http.get(&url).timeout(Duration::from_secs(1)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the node did not answer {url} within {NODE_START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// (user + system CPU seconds, resident bytes) from /proc.
    fn usage(&self) -> Result<(f64, u64)> {
        process_usage(self.pid)
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> Result<f64> {
        let text = http
            .get(format!("{}/metrics", self.base_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .text()
            .await?;
        metric_value(&text, name).ok_or_else(|| anyhow!("/metrics has no {name}"))
    }
}

fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        // Exactly this metric: no labels expected for the counters read here.
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn process_usage(pid: u32) -> Result<(f64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((common::process_cpu_seconds(pid), rss_kib * 1_024))
}

/// (busy, total) jiffies of one core from /proc/stat; busy includes irq and softirq time,
/// which per-process times do not (loopback delivery runs in softirq).
fn core_jiffies(core: usize) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{core} ");
    let line = stat
        .lines()
        .find(|l| l.starts_with(&name))
        .ok_or_else(|| anyhow!("no {name} in /proc/stat"))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Ok((busy, busy + get(3) + get(4)))
}

fn core_busy(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        0.0
    } else {
        after.0.saturating_sub(before.0) as f64 / total as f64
    }
}

fn create_token(args: &Args, identity: &str, grant: &str) -> Result<String> {
    let output = Command::new(&args.binary)
        .args([
            "token",
            "create",
            "--api-secret",
            API_SECRET,
            "--room",
            ROOM,
            "--identity",
            identity,
            grant,
        ])
        .args(["--ttl", "2h"])
        .output()
        .context("running `mediamesh token create`")?;
    if !output.status.success() {
        bail!("token create failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// The numbers of one run (one N).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct RunResult {
    subscribers: usize,
    /// `on`: the default node (spans, trace ids in logs); `off`: `--traces off`.
    telemetry: String,
    connected: usize,
    connect_failures: usize,
    first_error: Option<String>,
    connect_seconds: f64,
    measured_seconds: f64,
    publisher_packets_per_second: f64,
    /// Packets the node's publisher reader handed to the fan-out (after the WebRTC stack).
    node_ingress_packets_per_second: f64,
    egress_packets_per_second: f64,
    /// Egress the node should produce: subscribers × publisher packets/s.
    expected_egress_packets_per_second: f64,
    node_cpu_cores: f64,
    egress_packets_per_second_per_core: f64,
    client_received_packets_per_second: f64,
    client_cpu_cores: f64,
    client_saturated: bool,
    /// Share of the node's core busy with anything (other processes, softirq included).
    node_core_busy: f64,
    client_core_busy: f64,
    udp_receive_buffer_errors: u64,
    udp_send_buffer_errors: u64,
    connect_ms_p50: Option<f64>,
    loss_percent: f64,
    video_loss_percent: f64,
    node_queue_drops: f64,
    frame_gap_ms_max: f64,
    first_frame_ms_p50: Option<f64>,
    first_frame_ms_p99: Option<f64>,
    no_first_frame: usize,
    rss_publisher_only_bytes: u64,
    rss_bytes: u64,
    rss_per_subscriber_bytes: f64,
    active_connections: f64,
    kept_up: bool,
    verdict: String,
}

/// Cumulative receive counters of every subscriber at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct ClientTotals {
    packets: u64,
    expected: u64,
    lost: u64,
    video_expected: u64,
    video_lost: u64,
}

fn client_totals(sessions: &[PlaySession]) -> ClientTotals {
    let mut totals = ClientTotals::default();
    for session in sessions {
        let stats = session.stats();
        for track in [stats.video, stats.audio] {
            totals.packets += track.packets;
            totals.expected += track.packets_expected;
            totals.lost += track.packets_lost;
        }
        totals.video_expected += stats.video.packets_expected;
        totals.video_lost += stats.video.packets_lost;
    }
    totals
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

async fn run_one(args: &Args, n: usize, telemetry: &str, http: &reqwest::Client) -> Result<RunResult> {
    let mut node = NodeProcess::start(args, &format!("n{n}-{telemetry}"), telemetry)?;
    node.wait_healthy(http).await?;
    let base = node.base_url();
    let publish_token = create_token(args, "bench-publisher", "--publish")?;
    let subscribe_token = Arc::new(create_token(args, "bench-viewer", "--subscribe")?);
    let connect = ConnectOptions {
        http: Some(http.clone()),
        connect_timeout: Duration::from_secs(30),
        http_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let publisher: PublishSession = mediamesh_sdk::publish(
        &format!("{base}/whip/{ROOM}"),
        &publish_token,
        PublishOptions {
            connect: connect.clone(),
            ..Default::default()
        },
    )
    .await
    .context("publishing")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rss_publisher_only) = node.usage()?;

    // Subscribers, a few negotiations at a time (each is a DTLS handshake on the node's core).
    let connect_started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
    let mut joins = Vec::with_capacity(n);
    for _ in 0..n {
        let semaphore = Arc::clone(&semaphore);
        let token = Arc::clone(&subscribe_token);
        let url = format!("{base}/whep/{ROOM}");
        let options = PlayOptions {
            nack: args.nack,
            connect: connect.clone(),
            ..Default::default()
        };
        joins.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("the semaphore is never closed");
            mediamesh_sdk::play(&url, &token, options).await
        }));
    }
    let mut sessions = Vec::with_capacity(n);
    let mut failures = 0;
    let mut first_error = None;
    for join in joins {
        match join.await {
            Ok(Ok(session)) => sessions.push(session),
            Ok(Err(error)) => {
                failures += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
            Err(error) => {
                failures += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let first_frames =
        futures::future::join_all(sessions.iter().map(|s| s.wait_first_frame(FIRST_FRAME_TIMEOUT))).await;
    let no_first_frame = first_frames.iter().filter(|r| r.is_err()).count();
    eprintln!(
        "  N={n}: {} connected, {failures} failed in {connect_seconds:.1}s; warming up {:?}",
        sessions.len(),
        args.warmup
    );
    tokio::time::sleep(args.warmup).await;

    // Measurement window.
    let start = Instant::now();
    let forwarded_0 = node.metric(http, "mediamesh_rtp_packets_forwarded_total").await?;
    let dropped_0 = node
        .metric(http, "mediamesh_rtp_packets_dropped_total")
        .await
        .unwrap_or(0.0);
    let received_0 = node
        .metric(http, "mediamesh_rtp_packets_received_total")
        .await
        .unwrap_or(0.0);
    let (node_cpu_0, _) = node.usage()?;
    let (client_cpu_0, _) = process_usage(std::process::id())?;
    let clients_0 = client_totals(&sessions);
    let published_0 = publisher.stats();
    let node_core_0 = core_jiffies(args.node_core)?;
    let client_core_0 = core_jiffies(args.client_core)?;
    let udp_0 = common::udp_errors();
    tokio::time::sleep(args.duration).await;
    let node_core_1 = core_jiffies(args.node_core)?;
    let client_core_1 = core_jiffies(args.client_core)?;
    let udp_1 = common::udp_errors();
    let forwarded_1 = node.metric(http, "mediamesh_rtp_packets_forwarded_total").await?;
    let dropped_1 = node
        .metric(http, "mediamesh_rtp_packets_dropped_total")
        .await
        .unwrap_or(0.0);
    let received_1 = node
        .metric(http, "mediamesh_rtp_packets_received_total")
        .await
        .unwrap_or(0.0);
    let (node_cpu_1, rss) = node.usage()?;
    let (client_cpu_1, _) = process_usage(std::process::id())?;
    let clients_1 = client_totals(&sessions);
    let published_1 = publisher.stats();
    let seconds = start.elapsed().as_secs_f64();
    let active_connections = node
        .metric(http, "mediamesh_webrtc_active_connections")
        .await
        .unwrap_or(0.0);

    let egress = (forwarded_1 - forwarded_0) / seconds;
    let node_cpu = (node_cpu_1 - node_cpu_0) / seconds;
    let client_cpu = (client_cpu_1 - client_cpu_0) / seconds;
    let published_packets = (published_1.video_packets + published_1.audio_packets)
        - (published_0.video_packets + published_0.audio_packets);
    let publisher_pps = published_packets as f64 / seconds;
    let loss_percent = percent(clients_1.lost - clients_0.lost, clients_1.expected - clients_0.expected);
    let video_loss_percent = percent(
        clients_1.video_lost - clients_0.video_lost,
        clients_1.video_expected - clients_0.video_expected,
    );
    let mut latencies: Vec<f64> = first_frames
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|d| d.as_secs_f64() * 1_000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let frame_gap_ms_max = sessions
        .iter()
        .map(|s| s.stats().video.frame_gap_max.as_secs_f64() * 1_000.0)
        .fold(0.0, f64::max);
    let connected = sessions.len();
    let rss_per_subscriber = (rss as f64 - rss_publisher_only as f64) / n as f64;
    let kept_up = failures == 0 && no_first_frame == 0 && loss_percent <= args.loss_limit_percent;
    let client_core_busy = core_busy(client_core_0, client_core_1);
    let client_saturated = client_cpu >= CLIENT_SATURATED_CORES || client_core_busy >= 0.98;
    let mut connects: Vec<f64> = sessions
        .iter()
        .filter_map(|s| s.stats().connect_latency)
        .map(|d| d.as_secs_f64() * 1_000.0)
        .collect();
    connects.sort_by(f64::total_cmp);
    let verdict = if kept_up && loss_percent <= 1.0 {
        "ok".to_string()
    } else if kept_up {
        format!("loss {loss_percent:.2}% > 1%")
    } else if failures > 0 {
        format!("{failures} connection failures")
    } else if no_first_frame > 0 {
        format!("{no_first_frame} without a first frame")
    } else {
        format!("loss {loss_percent:.2}% > {}%", args.loss_limit_percent)
    };
    let result = RunResult {
        subscribers: n,
        telemetry: telemetry.to_string(),
        connected,
        connect_failures: failures,
        first_error,
        connect_seconds,
        measured_seconds: seconds,
        publisher_packets_per_second: publisher_pps,
        node_ingress_packets_per_second: (received_1 - received_0) / seconds,
        egress_packets_per_second: egress,
        expected_egress_packets_per_second: publisher_pps * n as f64,
        node_cpu_cores: node_cpu,
        egress_packets_per_second_per_core: if node_cpu > 0.0 { egress / node_cpu } else { 0.0 },
        client_received_packets_per_second: (clients_1.packets - clients_0.packets) as f64 / seconds,
        client_cpu_cores: client_cpu,
        client_saturated,
        node_core_busy: core_busy(node_core_0, node_core_1),
        client_core_busy,
        udp_receive_buffer_errors: udp_1.0.saturating_sub(udp_0.0),
        udp_send_buffer_errors: udp_1.1.saturating_sub(udp_0.1),
        connect_ms_p50: percentile(&connects, 50.0),
        loss_percent,
        video_loss_percent,
        node_queue_drops: dropped_1 - dropped_0,
        frame_gap_ms_max,
        first_frame_ms_p50: percentile(&latencies, 50.0),
        first_frame_ms_p99: percentile(&latencies, 99.0),
        no_first_frame,
        rss_publisher_only_bytes: rss_publisher_only,
        rss_bytes: rss,
        rss_per_subscriber_bytes: rss_per_subscriber,
        active_connections,
        kept_up,
        verdict,
    };

    // Tear down: DELETE every session (a few at a time), then stop the node.
    futures::stream::iter(sessions.into_iter().map(|session| session.close()))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let _ = publisher.close().await;
    drop(node);
    Ok(result)
}

async fn run(args: &Args) -> Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let started = SystemTime::now();
    eprintln!(
        "fanout: node on core {}, clients on core {}, N = {:?}, {:?} measured after {:?} warm-up",
        args.node_core, args.client_core, args.subscribers, args.duration, args.warmup
    );
    let mut results = Vec::new();
    for &n in &args.subscribers {
        let mut stop = false;
        for telemetry in &args.telemetry {
            eprintln!("fanout: N = {n}, telemetry {telemetry}");
            let result = match run_one(args, n, telemetry, &http).await {
                Ok(result) => result,
                Err(error) => RunResult {
                    subscribers: n,
                    telemetry: telemetry.clone(),
                    first_error: Some(format!("{error:#}")),
                    verdict: format!("run failed: {error:#}"),
                    ..Default::default()
                },
            };
            eprintln!(
                "  N={n}: egress {:.0} pkt/s, node {:.2} cores (its core {:.0}% busy), {:.0} pkt/s per core, loss {:.2}%, client {:.2} cores (its core {:.0}% busy), UDP rcvbuf errors {} -> {}",
                result.egress_packets_per_second,
                result.node_cpu_cores,
                result.node_core_busy * 100.0,
                result.egress_packets_per_second_per_core,
                result.loss_percent,
                result.client_cpu_cores,
                result.client_core_busy * 100.0,
                result.udp_receive_buffer_errors,
                result.verdict
            );
            stop |= !result.kept_up;
            results.push(result);
        }
        if stop {
            eprintln!("fanout: the node did not keep up at N = {n}; stopping here");
            break;
        }
    }
    write_report(args, started, &results)
}

fn machine() -> serde_json::Value {
    let facts = common::machine_facts();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "cpu_model": facts.cpu_model,
        "cores": facts.cores,
        "memory_gib": facts.memory_gib,
        "kernel": kernel.trim(),
    })
}

/// `YYYY-MM-DDTHH-MM-SSZ` of a time (civil-from-days, Howard Hinnant's algorithm).
fn utc_stamp(time: SystemTime, separator: char) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (seconds / 86_400) as i64;
    let (hour, minute, second) = (seconds % 86_400 / 3_600, seconds % 3_600 / 60, seconds % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}{separator}{minute:02}{separator}{second:02}Z")
}

fn fmt_opt_ms(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

/// With runs of the same N on and off, the cost of telemetry in egress per node-CPU-second.
fn write_telemetry_cost(md: &mut String, results: &[RunResult]) -> Result<()> {
    let pairs: Vec<(&RunResult, &RunResult)> = results
        .iter()
        .filter(|on| on.telemetry == "on")
        .filter_map(|on| {
            results
                .iter()
                .find(|off| off.telemetry == "off" && off.subscribers == on.subscribers)
                .map(|off| (on, off))
        })
        .collect();
    if pairs.is_empty() {
        return Ok(());
    }
    writeln!(md, "\n## Cost of telemetry (default node vs `--traces off`)\n")?;
    writeln!(
        md,
        "| N | egress pkt/s per node-CPU-second, on | off | cost | loss on / off |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|")?;
    for (on, off) in pairs {
        let base = off.egress_packets_per_second_per_core;
        let cost = if base > 0.0 {
            (base - on.egress_packets_per_second_per_core) / base * 100.0
        } else {
            0.0
        };
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {cost:.1} % | {:.2} % / {:.2} % |",
            on.subscribers, on.egress_packets_per_second_per_core, base, on.loss_percent, off.loss_percent
        )?;
    }
    writeln!(md, "\nAim: under 5 %. A negative cost is run-to-run noise.")?;
    Ok(())
}

fn write_report(args: &Args, started: SystemTime, results: &[RunResult]) -> Result<()> {
    let machine = machine();
    let commit = common::git_commit(&[]);
    let date = utc_stamp(started, ':');
    let parameters = serde_json::json!({
        "subscribers": args.subscribers,
        "duration_seconds": args.duration.as_secs_f64(),
        "warmup_seconds": args.warmup.as_secs_f64(),
        "node_core": args.node_core,
        "client_core": args.client_core,
        "loss_limit_percent": args.loss_limit_percent,
        "subscriber_nack": args.nack,
        "connect_concurrency": args.connect_concurrency,
        "publisher": "VP8 1.5 Mb/s @ 30 fps (keyframe every 60 frames, payloads <= 1200 B) + Opus 20 ms (60 B)",
        "binary": args.binary.display().to_string(),
        "telemetry": args.telemetry,
    });
    let json = serde_json::json!({
        "benchmark": "fanout",
        "date": date,
        "commit": commit,
        "machine": machine,
        "parameters": parameters,
        "results": results,
    });

    let mut md = String::new();
    writeln!(md, "# Fan-out benchmark — {date}\n")?;
    writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM, Linux {}",
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?")
    )?;
    writeln!(md, "- commit: {commit}")?;
    writeln!(
        md,
        "- node pinned to core {} (`taskset`), clients (this process, one thread) pinned to core {}",
        args.node_core, args.client_core
    )?;
    writeln!(
        md,
        "- one publisher: {}; N WHEP subscribers (NACK {}), {} s warm-up, {} s measured",
        parameters["publisher"].as_str().unwrap_or("?"),
        if args.nack { "on" } else { "off" },
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    )?;
    writeln!(
        md,
        "- command: `cargo bench --bench fanout -- --subscribers {} --duration {}s --telemetry {}`\n",
        args.subscribers
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(","),
        args.duration.as_secs_f64(),
        args.telemetry.join(",")
    )?;
    writeln!(
        md,
        "| N | telemetry | connected | publisher sent / node ingested pkt/s | egress pkt/s | expected pkt/s | node CPU (cores) | egress pkt/s per node-CPU-second | node core busy (all) | client rx pkt/s | client CPU (cores) | client core busy (all) | loss % | node queue drops | UDP rcvbuf / sndbuf errors | max frame gap ms | connect p50 ms | first frame p50 / p99 ms | RSS per subscriber | verdict |"
    )?;
    writeln!(
        md,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )?;
    for r in results {
        writeln!(
            md,
            "| {} | {} | {}/{} | {:.0} / {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0}% | {:.0} | {:.2}{} | {:.0}% | {:.2} | {:.0} | {} / {} | {:.0} | {} | {} / {} | {:.0} KiB | {} |",
            r.subscribers,
            r.telemetry,
            r.connected,
            r.subscribers,
            r.publisher_packets_per_second,
            r.node_ingress_packets_per_second,
            r.egress_packets_per_second,
            r.expected_egress_packets_per_second,
            r.node_cpu_cores,
            r.egress_packets_per_second_per_core,
            r.node_core_busy * 100.0,
            r.client_received_packets_per_second,
            r.client_cpu_cores,
            if r.client_saturated { " (saturated)" } else { "" },
            r.client_core_busy * 100.0,
            r.loss_percent,
            r.node_queue_drops,
            r.udp_receive_buffer_errors,
            r.udp_send_buffer_errors,
            r.frame_gap_ms_max,
            fmt_opt_ms(r.connect_ms_p50),
            fmt_opt_ms(r.first_frame_ms_p50),
            fmt_opt_ms(r.first_frame_ms_p99),
            r.rss_per_subscriber_bytes / 1_024.0,
            r.verdict
        )?;
    }
    writeln!(md)?;
    if results.iter().any(|r| r.client_saturated) {
        writeln!(
            md,
            "**The client core was saturated** in the runs marked so: loss and egress there may be limited by the \
             receiving side, not by the node.\n"
        )?;
    }
    for r in results.iter().filter(|r| r.node_core_busy - r.node_cpu_cores > 0.15) {
        writeln!(
            md,
            "- N={}: the node's core was {:.0}% busy while the node used {:.0}% of it: softirq (loopback delivery) \
             and other processes took the rest.",
            r.subscribers,
            r.node_core_busy * 100.0,
            r.node_cpu_cores * 100.0
        )?;
    }
    for r in results.iter().filter(|r| r.first_error.is_some()) {
        writeln!(
            md,
            "- N={}: first error: {}",
            r.subscribers,
            r.first_error.as_deref().unwrap_or("")
        )?;
    }
    let aim = results
        .iter()
        .filter(|r| r.kept_up && r.loss_percent <= 1.0)
        .map(|r| r.egress_packets_per_second_per_core)
        .fold(0.0, f64::max);
    writeln!(
        md,
        "\nBest egress per fully used core with ≤ 1% loss: **{aim:.0} pkt/s** (aim ≥ 100,000; LiveKit ~35k per vCPU, SRS ~125k per core)."
    )?;

    write_telemetry_cost(&mut md, results)?;

    let stamp = utc_stamp(started, '-');
    let written = common::write_results(&args.results_dir, "fanout", &stamp, &md, &json)?;
    println!("{md}");
    eprintln!("fanout: results written to {}", written.display());
    Ok(())
}
