//! Three `mediamesh node` processes on loopback take 10 000 viewer-state writes through the admin
//! API from concurrent writers spread over all nodes, while one node is killed with SIGKILL and
//! restarted twice (first the leader, then a follower). Afterwards every acknowledged write reads
//! back from every node, locally and linearizably, and the three state digests are equal.
//!
//! Keys are designed so the final value of each is known exactly: a key is written by one writer,
//! sequentially, with increasing `position_ms`. A write that was certainly not sent (connection
//! refused) is retried with the same value on the next node. Any other failure (timeout, 503,
//! connection reset by the kill) has an unknown outcome: the key is closed there, so its final
//! value is either its last acknowledged value or that one unknown value, never anything else.
//! A lost acknowledged write, a stale value or a divergent replica fails the test.

#[path = "common/cluster.rs"]
mod cluster;

use cluster::ProcessCluster;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const NODES: [(&str, &str); 3] = [("seoul-1", "seoul"), ("seoul-2", "seoul"), ("busan-1", "busan")];
/// Write attempts in total (acknowledged or not).
const WRITES_TOTAL: u64 = 10_000;
const WRITERS: usize = 24;
/// Sequential writes to one key before its writer moves to a new key.
const WRITES_PER_KEY_MAX: u64 = 16;
/// Whole-test budget pieces; every wait below has a deadline.
const CLUSTER_START_MAX: Duration = Duration::from_secs(20);
const WRITE_PHASE_MAX: Duration = Duration::from_secs(50);
const RESTART_READY_MAX: Duration = Duration::from_secs(15);
const CONVERGE_MAX: Duration = Duration::from_secs(15);
/// Above the node's store request deadline (5 s), so the server answers first.
const WRITE_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a killed node stays down: longer than the longest election timeout (2 s), so a
/// killed leader is replaced while it is down.
const DOWN_TIME: Duration = Duration::from_millis(2_500);
/// The fault schedule, in write tickets: kill 1 (the leader) after this many; writers pause at
/// the gate until its restart is ready; kill 2 (a follower); the last gate.
const KILL_1_AT: u64 = 1_500;
const GATE_1: u64 = 4_500;
const KILL_2_AT: u64 = 5_500;
const GATE_2: u64 = 9_000;
const READERS: usize = 6;

/// What the test knows about one key's final value.
#[derive(Clone, Debug, PartialEq)]
struct KeyRecord {
    writer: usize,
    /// Last acknowledged `position_ms`.
    acked: Option<u64>,
    /// A later write whose outcome is unknown (the key was closed after it).
    unknown: Option<u64>,
}

/// Checks one read (`None`: 404) against the record; the error names what is wrong.
fn check_read(key: &str, record: &KeyRecord, read: Option<u64>) -> Result<(), String> {
    let ok = match (read, record.acked, record.unknown) {
        (None, None, _) => true,
        (None, Some(_), _) => false,
        (Some(v), acked, unknown) => Some(v) == acked || Some(v) == unknown,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key}: read {read:?}, acknowledged {:?}, unknown outcome {:?}",
            record.acked, record.unknown
        ))
    }
}

#[test]
fn checker_catches_lost_and_stale_writes() {
    let r = |acked, unknown| KeyRecord {
        writer: 0,
        acked,
        unknown,
    };
    assert!(check_read("k", &r(Some(5), None), Some(5)).is_ok());
    assert!(check_read("k", &r(Some(5), None), None).is_err(), "lost write");
    assert!(check_read("k", &r(Some(5), None), Some(4)).is_err(), "stale write");
    assert!(check_read("k", &r(Some(5), None), Some(6)).is_err(), "never written");
    assert!(check_read("k", &r(Some(5), Some(6)), Some(6)).is_ok());
    assert!(check_read("k", &r(Some(5), Some(6)), Some(5)).is_ok());
    assert!(check_read("k", &r(Some(5), Some(6)), None).is_err(), "lost write");
    assert!(check_read("k", &r(None, Some(1)), None).is_ok());
    assert!(check_read("k", &r(None, Some(1)), Some(1)).is_ok());
    assert!(check_read("k", &r(None, Some(1)), Some(2)).is_err());
}

#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    /// Connection refused: certainly not sent (the node is down), retried elsewhere.
    refused: AtomicU64,
    /// Outcome unknown: timeout, reset, 5xx.
    unknown: AtomicU64,
    /// Answers that mean a bug in the test or the API (4xx, wrong body).
    wrong: AtomicU64,
}

struct Shared {
    urls: Vec<String>,
    token: String,
    tickets: AtomicU64,
    gate: AtomicU64,
    stop: AtomicBool,
    counts: Counts,
    deadline: Instant,
    latencies_us: Mutex<Vec<u64>>,
    wrong_answers: Mutex<Vec<String>>,
    statuses: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    /// The next write ticket, waiting at the gate; None when all are taken or the phase ends.
    fn take_ticket(&self) -> Option<u64> {
        loop {
            if self.stop.load(Ordering::SeqCst) || Instant::now() >= self.deadline {
                return None;
            }
            let t = self.tickets.load(Ordering::SeqCst);
            if t >= WRITES_TOTAL {
                return None;
            }
            if t >= self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if self
                .tickets
                .compare_exchange(t, t + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Some(t);
            }
        }
    }

    fn count_status(&self, what: String) {
        *self.statuses.lock().expect("not poisoned").entry(what).or_default() += 1;
    }
}

enum WriteResult {
    Acked,
    Refused,
    Unknown,
}

fn put_viewer(
    client: &reqwest::blocking::Client,
    shared: &Shared,
    node: usize,
    key: &str,
    writer: usize,
    value: u64,
) -> WriteResult {
    let body = json!({
        "room": format!("room-{writer}"),
        "position_ms": value,
        "subscriptions": ["camera"],
        "layers": {"camera": "h"},
        "session": format!("session-{key}"),
    });
    let started = Instant::now();
    let response = client
        .put(format!("{}/admin/v1/viewers/{key}", shared.urls[node]))
        .bearer_auth(&shared.token)
        .json(&body)
        .send();
    match response {
        Err(e) if e.is_connect() => {
            shared.count_status("connect error".into());
            WriteResult::Refused
        }
        Err(e) => {
            shared.count_status(if e.is_timeout() {
                "timeout".into()
            } else {
                "transport error".into()
            });
            WriteResult::Unknown
        }
        Ok(r) if r.status() == 200 => {
            let elapsed = started.elapsed();
            let stored: Result<Value, _> = r.json();
            match stored {
                Ok(v) if v["viewer"] == key && v["position_ms"] == value => {
                    shared.count_status("200".into());
                    shared
                        .latencies_us
                        .lock()
                        .expect("not poisoned")
                        .push(elapsed.as_micros() as u64);
                    WriteResult::Acked
                }
                other => {
                    shared.counts.wrong.fetch_add(1, Ordering::Relaxed);
                    shared
                        .wrong_answers
                        .lock()
                        .expect("not poisoned")
                        .push(format!("PUT {key}={value}: 200 with {other:?}"));
                    WriteResult::Unknown
                }
            }
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().unwrap_or_default();
            // The problem's detail, without numbers, so answers group by kind.
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_string))
                .unwrap_or_default();
            let kind: String = detail.chars().filter(|c| !c.is_ascii_digit()).take(80).collect();
            shared.count_status(format!("{status} {kind}"));
            if !(500..600).contains(&status) {
                shared.counts.wrong.fetch_add(1, Ordering::Relaxed);
                shared
                    .wrong_answers
                    .lock()
                    .expect("not poisoned")
                    .push(format!("PUT {key}={value}: {status} {text:.300}"));
            }
            WriteResult::Unknown
        }
    }
}

/// One writer: its own keys, sequential writes, each write to the next node in turn. A write
/// refused at connect (its node is down) is sent again, same value, to the next node; it keeps
/// its ticket, so every ticket is one write that reached a node.
fn run_writer(shared: &Shared, writer: usize) -> BTreeMap<String, KeyRecord> {
    let client = reqwest::blocking::Client::builder()
        .timeout(WRITE_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(1)
        .build()
        .expect("http client");
    let mut records = BTreeMap::new();
    let mut key_number = 0u64;
    let mut value = WRITES_PER_KEY_MAX;
    let mut key = String::new();
    let mut attempt = writer;
    'tickets: while let Some(_ticket) = shared.take_ticket() {
        if value >= WRITES_PER_KEY_MAX {
            key_number += 1;
            value = 0;
            key = format!("w{writer:02}-k{key_number:04}");
            records.insert(
                key.clone(),
                KeyRecord {
                    writer,
                    acked: None,
                    unknown: None,
                },
            );
        }
        let this_value = value + 1;
        let result = loop {
            let node = attempt % shared.urls.len();
            attempt += 1;
            match put_viewer(&client, shared, node, &key, writer, this_value) {
                WriteResult::Refused => {
                    shared.counts.refused.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= shared.deadline {
                        break 'tickets;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other,
            }
        };
        // The key was inserted above when it was opened.
        let record = records.get_mut(&key).expect("open key has a record");
        match result {
            WriteResult::Acked => {
                shared.counts.acked.fetch_add(1, Ordering::Relaxed);
                record.acked = Some(this_value);
                value = this_value;
            }
            WriteResult::Unknown | WriteResult::Refused => {
                shared.counts.unknown.fetch_add(1, Ordering::Relaxed);
                record.unknown = Some(this_value);
                value = WRITES_PER_KEY_MAX; // close the key
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    records
}

#[derive(Debug, Default)]
struct ChaosReport {
    events: Vec<String>,
}

/// The fault schedule: kill the leader, restart it; kill a follower, restart it. Runs while the
/// writers write; opens the gates after each restart is ready.
fn run_chaos(cluster: &mut ProcessCluster, shared: &Shared) -> Result<ChaosReport, String> {
    let mut report = ChaosReport::default();
    let started = Instant::now();
    let wait_tickets = |n: u64| -> Result<(), String> {
        while shared.tickets.load(Ordering::SeqCst) < n {
            if Instant::now() >= shared.deadline || shared.stop.load(Ordering::SeqCst) {
                return Err(format!("writers did not reach {n} writes in time"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    let mut last_victim = None;
    for (round, (kill_at, next_gate)) in [(KILL_1_AT, GATE_2), (KILL_2_AT, WRITES_TOTAL)].into_iter().enumerate() {
        wait_tickets(kill_at)?;
        let leader = cluster.leader().ok_or("no leader known before a kill")?;
        let victim = if round == 0 {
            leader
        } else {
            (0..cluster.nodes.len())
                .find(|&i| i != leader && Some(i) != last_victim)
                .or_else(|| (0..cluster.nodes.len()).find(|&i| i != leader))
                .ok_or("no follower to kill")?
        };
        let role = if victim == leader { "leader" } else { "follower" };
        let id = cluster.nodes[victim].spec.id.clone();
        let at_writes = shared.tickets.load(Ordering::SeqCst);
        cluster.kill(victim);
        let killed_at = Instant::now();
        report.events.push(format!(
            "{:>6.2}s SIGKILL {id} ({role}) at {at_writes} writes",
            started.elapsed().as_secs_f64()
        ));
        // A fault schedule, not a synchronization: the node stays down for a while.
        std::thread::sleep(DOWN_TIME);
        cluster.restart(victim);
        let restarted_at = Instant::now();
        cluster.try_wait_ready(victim, restarted_at + RESTART_READY_MAX)?;
        report.events.push(format!(
            "{:>6.2}s restarted {id} (down {:.2}s, ready {:.2}s after exec) at {} writes",
            started.elapsed().as_secs_f64(),
            restarted_at.duration_since(killed_at).as_secs_f64(),
            restarted_at.elapsed().as_secs_f64(),
            shared.tickets.load(Ordering::SeqCst)
        ));
        last_victim = Some(victim);
        shared.gate.store(next_gate, Ordering::SeqCst);
    }
    Ok(report)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Reads every key from node `node` with `consistency` and checks it; returns the violations.
fn verify_node(
    urls: &[String],
    token: &str,
    node: usize,
    consistency: &str,
    records: &[(String, KeyRecord)],
    deadline: Instant,
) -> Vec<String> {
    let chunk = records.len().div_ceil(READERS).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("http client");
                    let mut violations = Vec::new();
                    for (key, record) in part {
                        if Instant::now() >= deadline {
                            violations.push(format!("read phase out of time at {key}"));
                            break;
                        }
                        let url = format!("{}/admin/v1/viewers/{key}?consistency={consistency}", urls[node]);
                        let read = match client.get(&url).bearer_auth(token).send() {
                            Ok(r) if r.status() == 200 => match r.json::<Value>() {
                                Ok(v) if v["room"] == format!("room-{}", record.writer) => v["position_ms"].as_u64(),
                                other => {
                                    violations.push(format!("{key}: bad body {other:?}"));
                                    continue;
                                }
                            },
                            Ok(r) if r.status() == 404 => None,
                            Ok(r) => {
                                violations.push(format!("{key}: read answered {}", r.status()));
                                continue;
                            }
                            Err(e) => {
                                violations.push(format!("{key}: read failed: {e}"));
                                continue;
                            }
                        };
                        if let Err(e) = check_read(key, record, read) {
                            violations.push(e);
                        }
                    }
                    violations
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader thread"))
            .collect()
    })
}

#[test]
fn acknowledged_writes_survive_sigkill_and_restarts_of_nodes() {
    let test_started = Instant::now();
    let mut cluster = ProcessCluster::start(env!("CARGO_BIN_EXE_mediamesh").as_ref(), &NODES, &[], CLUSTER_START_MAX);
    let formed_in = test_started.elapsed();
    let shared = Shared {
        urls: cluster.nodes.iter().map(|n| n.base_url()).collect(),
        token: cluster.admin_token.clone(),
        tickets: AtomicU64::new(0),
        gate: AtomicU64::new(GATE_1),
        stop: AtomicBool::new(false),
        counts: Counts::default(),
        deadline: Instant::now() + WRITE_PHASE_MAX,
        latencies_us: Mutex::new(Vec::with_capacity(WRITES_TOTAL as usize)),
        wrong_answers: Mutex::new(Vec::new()),
        statuses: Mutex::new(BTreeMap::new()),
    };

    let writes_started = Instant::now();
    let (chaos, records) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let shared = &shared;
                scope.spawn(move || run_writer(shared, w))
            })
            .collect();
        let chaos = run_chaos(&mut cluster, &shared);
        if chaos.is_err() {
            shared.stop.store(true, Ordering::SeqCst);
        }
        let mut records = BTreeMap::new();
        for writer in writers {
            records.extend(writer.join().expect("writer thread"));
        }
        (chaos, records)
    });
    let write_phase = writes_started.elapsed();
    let chaos = chaos.unwrap_or_else(|e| panic!("fault schedule failed: {e}"));

    let acked = shared.counts.acked.load(Ordering::Relaxed);
    let refused = shared.counts.refused.load(Ordering::Relaxed);
    let unknown = shared.counts.unknown.load(Ordering::Relaxed);
    let wrong = shared.counts.wrong.load(Ordering::Relaxed);
    let mut latencies = std::mem::take(&mut *shared.latencies_us.lock().expect("not poisoned"));
    latencies.sort_unstable();
    println!("cluster formed in {:.2}s", formed_in.as_secs_f64());
    for event in &chaos.events {
        println!("{event}");
    }
    println!(
        "writes: {} sent, {acked} acknowledged, {unknown} unknown outcome (failed), {wrong} wrong answers; {refused} connects refused by a down node (resent to the next node)",
        shared.tickets.load(Ordering::SeqCst)
    );
    println!("answers by status: {:?}", shared.statuses.lock().expect("not poisoned"));
    println!(
        "write phase {:.2}s, {:.0} acknowledged writes/s (including the gated pauses), latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        write_phase.as_secs_f64(),
        acked as f64 / write_phase.as_secs_f64(),
        percentile(&latencies, 0.50) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    assert_eq!(
        shared.tickets.load(Ordering::SeqCst),
        WRITES_TOTAL,
        "the writers ran out of time"
    );
    assert!(
        shared.wrong_answers.lock().expect("not poisoned").is_empty(),
        "wrong answers: {:?}",
        shared.wrong_answers.lock().expect("not poisoned")
    );
    assert_eq!(acked + unknown, WRITES_TOTAL);
    assert!(acked >= WRITES_TOTAL / 2, "too few writes were acknowledged: {acked}");

    // Every node is up and converges to one applied index and one digest.
    let verify_started = Instant::now();
    for i in 0..cluster.nodes.len() {
        cluster.wait_ready(i, verify_started + RESTART_READY_MAX);
    }
    let (applied, digest) = cluster
        .wait_converged(verify_started + CONVERGE_MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    let converged_in = verify_started.elapsed();
    println!(
        "converged in {:.3}s after the last write: applied index {applied}, digest {digest:.16} on all nodes",
        converged_in.as_secs_f64()
    );

    let records: Vec<(String, KeyRecord)> = records.into_iter().collect();
    let reads_started = Instant::now();
    let read_deadline = reads_started + Duration::from_secs(30);
    let mut violations = Vec::new();
    for consistency in ["local", "linearizable"] {
        for node in 0..cluster.nodes.len() {
            let found = verify_node(&shared.urls, &shared.token, node, consistency, &records, read_deadline);
            if !found.is_empty() {
                violations.push(format!(
                    "{} ({consistency}): {} violations, first: {:?}",
                    cluster.nodes[node].spec.id,
                    found.len(),
                    &found[..found.len().min(10)]
                ));
            }
        }
    }
    let with_unknown = records.iter().filter(|(_, r)| r.unknown.is_some()).count();
    println!(
        "verified {} keys ({with_unknown} with an unknown-outcome last write) on {} nodes, local and linearizable, in {:.2}s",
        records.len(),
        cluster.nodes.len(),
        reads_started.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "acknowledged writes not read back: {violations:#?}"
    );

    // The digests still agree after the reads (which wrote nothing) once the nodes settle.
    let (_, digest_after) = cluster
        .wait_converged(Instant::now() + CONVERGE_MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!digest_after.is_empty());
    for i in 0..cluster.nodes.len() {
        let problems = cluster.log_problems(i);
        println!(
            "{}: {} warn/error log lines{}",
            cluster.nodes[i].spec.id,
            problems.len(),
            problems
                .first()
                .map(|l| format!(", first: {l:.300}"))
                .unwrap_or_default()
        );
    }
    println!("total {:.2}s", test_started.elapsed().as_secs_f64());
}
