//! TURN relay benchmark: coturn's `turnutils_uclient` against the mediamesh relay and against
//! coturn's `turnserver` on the same machine, with the same parameters, one after the other.
//!
//! ```text
//! cargo build --release -p mediamesh
//! cargo bench --bench turn -- [--clients 50,100] [--messages 1000] [--length 200] [--interval-ms 5]
//! ```
//!
//! Each run gets a freshly started server (allocations outlive uclient), a `turnutils_peer` echo
//! peer on 127.0.0.1, and `turnutils_uclient -c -m CLIENTS -n MESSAGES -l LENGTH -z INTERVAL`
//! (channels, no RTCP allocations) with REST credentials from the same secret (`-W`). Everything is
//! loopback. Reported: relayed datagrams per second (client→peer plus peer→client, over uclient's
//! transmit time), loss, average RTT, and the server's CPU seconds (utime+stime from /proc).
//! Results go to `benches/results/turn-<UTC>.{md,json}` and `turn-latest.{md,json}`.

#[path = "common/mod.rs"]
mod common;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "turn-bench-secret-0123456789";
const API_SECRET: &str = "turn-bench-api-secret-0123456789";
const RELAY_PORTS: (u16, u16) = (40_000, 49_999);
const START_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    clients: Vec<usize>,
    messages: usize,
    length: usize,
    interval_ms: u64,
    binary: PathBuf,
    results_dir: PathBuf,
}

fn parse_args() -> Result<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        clients: vec![50, 100],
        messages: 1000,
        length: 200,
        interval_ms: 5,
        binary: root.join("target/release/mediamesh"),
        results_dir: root.join("benches/results"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("missing value");
        match flag.as_str() {
            "--clients" => args.clients = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--messages" => args.messages = value()?.parse()?,
            "--length" => args.length = value()?.parse()?,
            "--interval-ms" => args.interval_ms = value()?.parse()?,
            "--binary" => args.binary = PathBuf::from(value()?),
            "--results" => args.results_dir = PathBuf::from(value()?),
            "--bench" => {}
            other => bail!(
                "unknown flag {other}\nusage: cargo bench --bench turn -- [--clients 50,100] [--messages 1000] \
                 [--length 200] [--interval-ms 5] [--binary target/release/mediamesh] [--results benches/results]"
            ),
        }
    }
    Ok(args)
}

/// A UDP port free on loopback (and the next one), outside the relay range.
fn free_udp_port() -> Result<u16> {
    for _ in 0..100 {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        if !(RELAY_PORTS.0 - 1..=RELAY_PORTS.1).contains(&port)
            && port < u16::MAX
            && UdpSocket::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no free UDP port")
}

/// A child killed (SIGTERM, then SIGKILL) on drop.
struct Process {
    child: Child,
    name: &'static str,
    dir: Option<PathBuf>,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command, dir: Option<PathBuf>) -> Result<Process> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Process { child, name, dir })
    }

    /// utime + stime of the process, in seconds.
    fn cpu_seconds(&self) -> f64 {
        common::process_cpu_seconds(self.child.id())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = self.name;
    }
}

/// Waits until a STUN Binding request to `addr` is answered.
fn wait_stun(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(&[7u8; 12]);
    let deadline = Instant::now() + START_TIMEOUT;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        socket.send_to(&request, addr)?;
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && n >= 20
            && buf[0..2] == [0x01, 0x01]
        {
            return Ok(());
        }
    }
    bail!("no STUN answer from {addr}")
}

fn start_mediamesh(args: &Args, turn_port: u16, peer_port: u16) -> Result<Process> {
    let dir = std::env::temp_dir().join(format!("mediamesh-turn-bench-{}-{turn_port}", std::process::id()));
    let http = common::free_tcp_port()?;
    let mut command = Command::new(&args.binary);
    command
        .arg("node")
        .args(["--node-id", "turn-bench"])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--grpc", &format!("127.0.0.1:{}", common::free_tcp_port()?)])
        .args(["--cluster", &format!("127.0.0.1:{}", common::free_tcp_port()?)])
        .args(["--advertise", "127.0.0.1"])
        .args(["--media-ports", "30000-30099"])
        .args(["--api-secret", API_SECRET])
        .args(["--turn", &format!("127.0.0.1:{turn_port}")])
        .args(["--turn-relay-ports", &format!("{}-{}", RELAY_PORTS.0, RELAY_PORTS.1)])
        // uclient binds a channel to the peer's port + 1 (its RTCP port) even with -c.
        .args(["--turn-allow", &format!("127.0.0.1:{peer_port}-{}", peer_port + 1)])
        .args(["--turn-allocations-per-identity-max", "100000"])
        .args(["--turn-allocations-max", "100000"])
        .args(["--turn-allocation-bytes-per-second-max", "0"]);
    let process = Process::spawn("mediamesh", &mut command, Some(dir))?;
    let base = format!("http://127.0.0.1:{http}");
    let deadline = Instant::now() + START_TIMEOUT;
    let client = reqwest::blocking::Client::new();
    while reqwest::blocking::get(format!("{base}/readyz"))
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("mediamesh not ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin = mediamesh::auth::TokenKeys::new(API_SECRET).create(
        "bench",
        "*",
        mediamesh::auth::Grants {
            admin: true,
            ..Default::default()
        },
        Duration::from_secs(600),
    );
    let response = client
        .post(format!("{base}/admin/v1/turn/rotate"))
        .bearer_auth(admin)
        .json(&serde_json::json!({ "secret": SECRET }))
        .send()?;
    if response.status() != 200 {
        bail!("rotate: {}", response.status());
    }
    wait_stun(SocketAddr::from(([127, 0, 0, 1], turn_port)))?;
    Ok(process)
}

fn start_coturn(turn_port: u16) -> Result<Process> {
    let dir = std::env::temp_dir().join(format!("coturn-bench-{}-{turn_port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut command = Command::new("turnserver");
    command
        .arg("-n")
        .arg("--listening-ip=127.0.0.1")
        .arg(format!("--listening-port={turn_port}"))
        .arg("--relay-ip=127.0.0.1")
        .arg(format!("--min-port={}", RELAY_PORTS.0))
        .arg(format!("--max-port={}", RELAY_PORTS.1))
        .arg("--use-auth-secret")
        .arg(format!("--static-auth-secret={SECRET}"))
        .arg("--realm=mediamesh")
        .args(["--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay", "--no-cli"])
        .args(["--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1"])
        .arg(format!("--userdb={}", dir.join("turndb").display()))
        .arg(format!("--pidfile={}", dir.join("turn.pid").display()))
        .arg(format!("--log-file={}", dir.join("turn.log").display()))
        .arg("--no-stdout-log");
    let process = Process::spawn("turnserver", &mut command, Some(dir))?;
    wait_stun(SocketAddr::from(([127, 0, 0, 1], turn_port)))?;
    Ok(process)
}

#[derive(Debug, serde::Serialize)]
struct RunResult {
    server: &'static str,
    clients: usize,
    sent: u64,
    received: u64,
    transmit_seconds: f64,
    wall_seconds: f64,
    relayed_packets_per_second: f64,
    loss_percent: f64,
    rtt_ms_average: f64,
    server_cpu_seconds: f64,
    server_cpu_seconds_per_100k_packets: f64,
    /// Machine-wide UDP receive-buffer overflows during the run.
    udp_rcvbuf_errors: u64,
    exit_code: i32,
}

/// The number right after the last `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<f64> {
    let start = text.rfind(key)? + key.len();
    leading_number(&text[start..])
}

fn leading_number(text: &str) -> Option<f64> {
    let rest = text.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn run(args: &Args, server: &'static str, clients: usize) -> Result<RunResult> {
    let (turn_port, peer_port) = (free_udp_port()?, free_udp_port()?);
    let process = match server {
        "mediamesh" => start_mediamesh(args, turn_port, peer_port)?,
        _ => start_coturn(turn_port)?,
    };
    let _peer = Process::spawn(
        "turnutils_peer",
        Command::new("turnutils_peer").args(["-L", "127.0.0.1", "-p", &peer_port.to_string()]),
        None,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = process.cpu_seconds();
    let rcvbuf_before = common::udp_errors().0;
    let started = Instant::now();
    let output = Command::new("turnutils_uclient")
        .args(["-W", SECRET, "-u", "bench", "-c"])
        .args(["-m", &clients.to_string(), "-n", &args.messages.to_string()])
        .args(["-l", &args.length.to_string(), "-z", &args.interval_ms.to_string()])
        .args([
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-p",
            &turn_port.to_string(),
        ])
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .context("running turnutils_uclient")?;
    let wall_seconds = started.elapsed().as_secs_f64();
    let server_cpu_seconds = process.cpu_seconds() - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout);
    let sent = number_after(&text, "tot_send_msgs=").unwrap_or(0.0) as u64;
    let received = number_after(&text, "tot_recv_msgs=").unwrap_or(0.0) as u64;
    let transmit_seconds = number_after(&text, "Total transmit time is")
        .unwrap_or(wall_seconds)
        .max(1.0);
    let relayed = (sent + received) as f64;
    let result = RunResult {
        server,
        clients,
        sent,
        received,
        transmit_seconds,
        wall_seconds,
        relayed_packets_per_second: relayed / transmit_seconds,
        // "Total lost packets N (P%), total send dropped ...": P, or 100 without the line.
        loss_percent: text
            .lines()
            .find(|l| l.contains("Total lost packets"))
            .and_then(|l| leading_number(l.split_once('(')?.1))
            .unwrap_or(100.0),
        rtt_ms_average: number_after(&text, "Average round trip delay").unwrap_or(f64::NAN),
        server_cpu_seconds,
        server_cpu_seconds_per_100k_packets: if relayed > 0.0 {
            server_cpu_seconds / relayed * 100_000.0
        } else {
            f64::NAN
        },
        udp_rcvbuf_errors: common::udp_errors().0.saturating_sub(rcvbuf_before),
        exit_code: output.status.code().unwrap_or(-1),
    };
    eprintln!("turn bench: {result:?}");
    Ok(result)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !args.binary.is_file() {
        bail!(
            "{} is missing: run `cargo build --release -p mediamesh` first",
            args.binary.display()
        );
    }
    for tool in ["turnutils_uclient", "turnutils_peer", "turnserver"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?
            .stdout
            .is_empty()
        {
            bail!("{tool} is missing: install Debian's coturn (tests/e2e/setup.sh does)");
        }
    }
    let started = SystemTime::now();
    let mut results = Vec::new();
    for &clients in &args.clients {
        for server in ["mediamesh", "coturn"] {
            results.push(run(&args, server, clients)?);
        }
    }
    write_report(&args, started, &results)
}

fn write_report(args: &Args, started: SystemTime, results: &[RunResult]) -> Result<()> {
    let facts = common::machine_facts();
    let ms = started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let date = mediamesh::clock::rfc3339_ms(ms);
    // The server is what is measured: a change under src/ or actors/ not committed yet shows.
    let commit = common::git_commit(&["src", "actors", "cluster"]);
    let coturn_version = Command::new("turnserver")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let command = format!(
        "turnutils_uclient -W <secret> -u bench -c -m <clients> -n {} -l {} -z {} -e 127.0.0.1 -r <peer> -p <port> 127.0.0.1",
        args.messages, args.length, args.interval_ms
    );
    let mut md = String::new();
    writeln!(md, "# TURN relay benchmark — {date}\n")?;
    writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM; commit {commit}; coturn {coturn_version}",
        facts.cpu_model, facts.cores, facts.memory_gib
    )?;
    writeln!(
        md,
        "- client: `{command}` against each server, fresh server per run, loopback only"
    )?;
    writeln!(
        md,
        "- relayed pkt/s = (sent + received by uclient) ÷ uclient's transmit time (whole seconds, includes its 1–6 s ramp-up); \
         server CPU = utime+stime of the server process during the run\n"
    )?;
    writeln!(
        md,
        "| clients | server | sent | received | relayed pkt/s | loss % | avg RTT ms | server CPU s | CPU s per 100k pkts | UDP rcvbuf errors | uclient exit |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in results {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.3} | {:.2} | {:.3} | {} | {} |",
            r.clients,
            r.server,
            r.sent,
            r.received,
            r.relayed_packets_per_second,
            r.loss_percent,
            r.rtt_ms_average,
            r.server_cpu_seconds,
            r.server_cpu_seconds_per_100k_packets,
            r.udp_rcvbuf_errors,
            r.exit_code
        )?;
    }
    let json = serde_json::json!({
        "benchmark": "turn",
        "date": date,
        "commit": commit,
        "machine": {"cpu_model": facts.cpu_model, "cores": facts.cores, "memory_gib": facts.memory_gib},
        "coturn": coturn_version,
        "parameters": {"clients": args.clients, "messages": args.messages, "length": args.length,
                       "interval_ms": args.interval_ms, "command": command},
        "results": results,
    });
    common::write_results(&args.results_dir, "turn", &date.replace(':', "-"), &md, &json)?;
    println!("{md}");
    Ok(())
}
