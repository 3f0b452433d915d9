//! Mesh benchmark: live migration of a room with 10, 50 and 200 viewers (admin time, wall time
//! until every viewer has frames again on the target, per-viewer media gap) and failover after
//! SIGKILL of the room's host (time until 95 % and 100 % of the viewers have frames again).
//!
//! ```text
//! cargo bench --bench mesh -- [--viewers 10,50,200] [--failover-viewers 10,50] [--binary PATH]
//!                              [--results DIR]
//! ```
//!
//! Every case gets a fresh cluster of three `mediamesh node` processes on loopback (seoul-1,
//! seoul-2, busan-1; the release binary `cargo bench` builds, `CARGO_BIN_EXE_mediamesh`), started
//! by the process-cluster harness of the tests (`tests/common/cluster.rs`), and its clients are Rust
//! SDK signal clients (WebSocket) in this process: one publisher (synthetic VP8 at 200 kb/s,
//! 30 fps, a keyframe every 30 frames, plus Opus) and N viewers.
//!
//! - **Migration**: the publisher joins seoul-1 preferring `seoul`; the viewers join the room's
//!   host. The harness gives each node 160 media ports (one per connection), so above
//!   150 viewers half join the host and half the other seoul node (which relays the room and
//!   keeps its viewers; only the host's signal clients move). Once every viewer has its first
//!   frame and frames flow for 2 s, `POST /admin/v1/rooms/{room}/migrate {"to":"busan-1"}`;
//!   the bench polls every viewer every 50 ms until each has 5 frames more than it had when it
//!   was first seen on busan-1 (relayed viewers: than when the POST was answered).
//! - **Failover**: the publisher and N viewers join busan-1 preferring `busan`, busan-1 gets
//!   SIGKILL, and the bench polls every 50 ms until 95 % (rounded up) and then all viewers have
//!   5 frames more than at the kill.
//!
//! Results go to `benches/results/mesh-<UTC>.{md,json}` and `mesh-latest.{md,json}`. Every wait
//! has a deadline; a case that fails is reported with its error and the next one runs. The node
//! processes and their data directories are removed when each case ends (also on panic).

#[path = "../tests/common/cluster.rs"]
mod cluster;

#[path = "common/mod.rs"]
mod common;

use cluster::ProcessCluster;
use futures::StreamExt as _;
use mediamesh_sdk::{Client, PlayOptions, PublishOptions, Role};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const NODES: [(&str, &str); 3] = [("seoul-1", "seoul"), ("seoul-2", "seoul"), ("busan-1", "busan")];
const TARGET: &str = "busan-1";
const CLUSTER_START_MAX: Duration = Duration::from_secs(30);
/// Viewers that join at once.
const JOIN_CONCURRENCY: usize = 16;
const FIRST_FRAME_MAX: Duration = Duration::from_secs(30);
/// Frames must flow this long before a migration or a kill: each viewer gets `FLOW_FRAMES_MIN`
/// frames in `FLOW_WINDOW` (30 fps: 60 expected).
const FLOW_WINDOW: Duration = Duration::from_secs(2);
const FLOW_FRAMES_MIN: u64 = 20;
const FLOW_TRIES: usize = 3;
/// A viewer counts as back once it has this many frames more than at its reference point.
const NEW_FRAMES: u64 = 5;
const POLL: Duration = Duration::from_millis(50);
/// One viewer's poll gives up after this long and keeps its last count: the SDK holds its play
/// statistics while it reconnects, and one viewer must not hold up the poll of the others.
const POLL_ONE_MAX: Duration = Duration::from_millis(20);
/// A viewer whose frame count stands still this long (30 fps: 33 ms per frame) is stalled.
const STALL: Duration = Duration::from_millis(250);
const MIGRATION_MAX: Duration = Duration::from_secs(60);
const FAILOVER_MAX: Duration = Duration::from_secs(45);
const PLACEMENT_MAX: Duration = Duration::from_secs(10);
const CLOSE_MAX: Duration = Duration::from_secs(20);
/// Most viewers on one node: the harness gives each node 160 media ports, one per connection.
const VIEWERS_PER_NODE_MAX: usize = 150;
const VIDEO_BITRATE_BPS: u64 = 200_000;
const KEYFRAME_INTERVAL_FRAMES: u32 = 30;

#[derive(Debug, Clone)]
struct Args {
    viewers: Vec<usize>,
    failover_viewers: Vec<usize>,
    binary: PathBuf,
    results_dir: PathBuf,
}

fn usage() -> &'static str {
    "cargo bench --bench mesh -- [--viewers 10,50,200] [--failover-viewers 10,50] \
     [--binary target/release/mediamesh] [--results benches/results]"
}

fn parse_counts(flag: &str, text: &str) -> Result<Vec<usize>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().ok().filter(|n| *n > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{flag} takes positive numbers like 10,50 (or \"\" for none)"))
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        viewers: vec![10, 50, 200],
        failover_viewers: vec![10, 50],
        binary: PathBuf::from(env!("CARGO_BIN_EXE_mediamesh")),
        results_dir: root.join("benches").join("results"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{}", usage()));
        match flag.as_str() {
            "--bench" => {} // cargo bench passes it to harness = false targets
            "--viewers" => args.viewers = parse_counts("--viewers", &value()?)?,
            "--failover-viewers" => args.failover_viewers = parse_counts("--failover-viewers", &value()?)?,
            "--binary" => args.binary = PathBuf::from(value()?),
            "--results" => args.results_dir = PathBuf::from(value()?),
            "--help" | "-h" => return Err(usage().to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(args)
}

// ----- the cluster and its clients -----

/// What the async part needs of the cluster (the cluster itself stays with the caller, which
/// kills it and drops it outside the runtime).
#[derive(Clone)]
struct Mesh {
    secret: String,
    admin_token: String,
    /// (id, region, HTTP base URL)
    nodes: Vec<(String, String, String)>,
}

impl Mesh {
    fn of(cluster: &ProcessCluster) -> Mesh {
        Mesh {
            secret: cluster.secret.clone(),
            admin_token: cluster.admin_token.clone(),
            nodes: cluster
                .nodes
                .iter()
                .map(|n| (n.spec.id.clone(), n.spec.region.clone(), n.base_url()))
                .collect(),
        }
    }

    fn index_of(&self, id: &str) -> Result<usize, String> {
        self.nodes
            .iter()
            .position(|n| n.0 == id)
            .ok_or_else(|| format!("no node {id}"))
    }

    fn token(&self, room: &str, identity: &str, role: Role) -> String {
        cluster::sdk_token(&self.secret, room, identity, role)
    }
}

async fn publisher(mesh: &Mesh, node: usize, room: &str) -> Result<Client, String> {
    let (_, region, base) = &mesh.nodes[node];
    let client = Client::connect(
        base,
        &mesh.token(room, "publisher-1", Role::Publisher),
        cluster::sdk_options(room, Role::Publisher, region),
    )
    .await
    .map_err(|e| format!("publisher joins {room} at {base}: {e}"))?;
    client
        .publish(PublishOptions {
            video_bitrate_bps: VIDEO_BITRATE_BPS,
            keyframe_interval_frames: KEYFRAME_INTERVAL_FRAMES,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("publisher publishes: {e}"))?;
    Ok(client)
}

/// Viewers `ids` join at `node` (at most `JOIN_CONCURRENCY` at once) and play; those that
/// joined are appended to `out` (so they are closed whatever happens next). Then every one of
/// them waits for its first frame.
async fn join_viewers(
    mesh: &Mesh,
    node: usize,
    room: &str,
    ids: std::ops::Range<usize>,
    out: &mut Vec<Client>,
) -> Result<(), String> {
    let (_, region, base) = &mesh.nodes[node];
    let first = out.len();
    let joined: Vec<Result<Client, String>> = futures::stream::iter(ids)
        .map(|i| {
            let token = mesh.token(room, &format!("viewer-{i}"), Role::Subscriber);
            async move {
                let client = Client::connect(base, &token, cluster::sdk_options(room, Role::Subscriber, region))
                    .await
                    .map_err(|e| format!("viewer {i} joins at {base}: {e}"))?;
                client
                    .play(PlayOptions::default())
                    .await
                    .map_err(|e| format!("viewer {i} plays: {e}"))?;
                Ok(client)
            }
        })
        .buffered(JOIN_CONCURRENCY)
        .collect()
        .await;
    let mut first_error = None;
    for result in joined {
        match result {
            Ok(client) => out.push(client),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let deadline = tokio::time::Instant::now() + FIRST_FRAME_MAX;
    let waits = out[first..].iter().map(|c| async move {
        c.wait_first_frame(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
    });
    let results = futures::future::join_all(waits).await;
    let missing = results.iter().filter(|r| r.is_err()).count();
    if missing > 0 {
        return Err(format!(
            "{missing} of {} viewers at {base} had no first frame within {FIRST_FRAME_MAX:?}",
            results.len()
        ));
    }
    Ok(())
}

async fn get_json(url: &str, token: &str) -> Result<Value, String> {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()));
    }
    response.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// The room's placement `(node, epoch)` as node `via` has it, retried until `PLACEMENT_MAX`.
async fn placement(mesh: &Mesh, via: usize, room: &str) -> Result<(String, u64), String> {
    let url = format!("{}/admin/v1/rooms/{room}", mesh.nodes[via].2);
    let deadline = Instant::now() + PLACEMENT_MAX;
    loop {
        let result = get_json(&url, &mesh.admin_token).await.and_then(|body| {
            let placement = &body["placement"];
            match (placement["node"].as_str(), placement["epoch"].as_u64()) {
                (Some(node), Some(epoch)) => Ok((node.to_string(), epoch)),
                _ => Err(format!("{room} not placed: {body}")),
            }
        });
        match result {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn frames_of(clients: &[Client]) -> Vec<u64> {
    futures::future::join_all(clients.iter().map(|c| async { c.play_stats().await.video.frames })).await
}

/// The frame counts now, without waiting for a viewer whose statistics are busy (it keeps
/// `last[i]`).
async fn poll_frames(clients: &[Client], last: &[u64]) -> Vec<u64> {
    futures::future::join_all(clients.iter().zip(last).map(|(c, &last)| async move {
        tokio::time::timeout(POLL_ONE_MAX, c.play_stats())
            .await
            .map_or(last, |s| s.video.frames)
    }))
    .await
}

async fn gaps_of(clients: &[Client]) -> Vec<Duration> {
    futures::future::join_all(
        clients
            .iter()
            .map(|c| async { c.play_stats().await.video.frame_gap_max }),
    )
    .await
}

/// Whether every viewer gets `FLOW_FRAMES_MIN` frames in `FLOW_WINDOW`; up to `FLOW_TRIES`
/// windows.
async fn wait_flowing(clients: &[Client]) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..FLOW_TRIES {
        let before = frames_of(clients).await;
        tokio::time::sleep(FLOW_WINDOW).await;
        let after = frames_of(clients).await;
        let stalled = (0..clients.len())
            .filter(|&i| after[i].saturating_sub(before[i]) < FLOW_FRAMES_MIN)
            .count();
        if stalled == 0 {
            return Ok(());
        }
        last = format!("{stalled} viewers got fewer than {FLOW_FRAMES_MIN} frames in {FLOW_WINDOW:?}");
    }
    Err(last)
}

/// p50 / p99 / max of per-viewer values, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Spread {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Spread {
    fn of(values: &[Duration]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort();
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
        Some(Spread {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

fn spread_cell(spread: Option<Spread>) -> String {
    spread.map_or("-".into(), |s| {
        format!("{:.0} / {:.0} / {:.0}", s.p50_ms, s.p99_ms, s.max_ms)
    })
}

fn ms_cell(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

/// Per viewer, the longest time its frame count stood still, as seen by polling, and when its
/// last stall (≥ `STALL`) ended.
struct StallWatch {
    frames: Vec<u64>,
    changed: Vec<Instant>,
    longest: Vec<Duration>,
    recovered: Vec<Option<Instant>>,
}

impl StallWatch {
    fn new(frames: Vec<u64>) -> StallWatch {
        let now = Instant::now();
        StallWatch {
            changed: vec![now; frames.len()],
            longest: vec![Duration::ZERO; frames.len()],
            recovered: vec![None; frames.len()],
            frames,
        }
    }

    fn update(&mut self, frames: &[u64]) {
        let now = Instant::now();
        for (i, &f) in frames.iter().enumerate() {
            let stood = now.duration_since(self.changed[i]);
            self.longest[i] = self.longest[i].max(stood);
            if f != self.frames[i] {
                if stood >= STALL {
                    self.recovered[i] = Some(now);
                }
                self.frames[i] = f;
                self.changed[i] = now;
            }
        }
    }

    /// Viewers whose frame count stands still for `STALL` or longer now.
    fn stalled_now(&self) -> usize {
        let now = Instant::now();
        self.changed.iter().filter(|c| now.duration_since(**c) >= STALL).count()
    }
}

fn now_flowing(watch: &StallWatch, i: usize) -> bool {
    Instant::now().duration_since(watch.changed[i]) < STALL
}

async fn close_all(clients: Vec<Client>) {
    let closing = futures::future::join_all(clients.into_iter().map(Client::close));
    if tokio::time::timeout(CLOSE_MAX, closing).await.is_err() {
        println!("  (some clients did not close within {CLOSE_MAX:?}; dropped)");
    }
}

// ----- migration -----

#[derive(Debug, Default, serde::Serialize)]
struct MigrationRow {
    viewers: usize,
    /// The room's host before the migration.
    from: String,
    /// Viewers joined at the host (they move) and at the other seoul node (they stay; that
    /// node re-points its relay).
    moved_viewers: usize,
    relayed_viewers: usize,
    relay_node: Option<String>,
    epoch_before: Option<u64>,
    epoch_after: Option<u64>,
    /// `elapsed_ms` of the admin answer.
    admin_elapsed_ms: Option<u64>,
    /// Wall time from sending the POST to its answer.
    post_answered_ms: Option<f64>,
    /// Wall time from sending the POST until every viewer had `NEW_FRAMES` frames on its new
    /// path (moved viewers: on busan-1) and the end of its last stall (≥ 250 ms), whichever is
    /// later.
    all_back_ms: Option<f64>,
    viewers_back: usize,
    /// SDK `frame_gap_max` per viewer (the largest gap of its whole play) before the migration
    /// and after it.
    gap_before: Option<Spread>,
    gap_after: Option<Spread>,
    gap_after_moved: Option<Spread>,
    gap_after_relayed: Option<Spread>,
    /// Longest time each viewer's frame count stood still from the POST until all had flowed
    /// for 2 s without a stall, polled every 50 ms.
    stall_polled: Option<Spread>,
    /// Moved viewers with their session back on busan-1.
    resumed: usize,
    publisher_on_target: bool,
    /// Every viewer got frames without a stall for 2 s at the end.
    flowing_after: bool,
    notes: Vec<String>,
    error: Option<String>,
}

async fn migration_case(mesh: &Mesh, row: &mut MigrationRow, clients: &mut Vec<Client>) -> Result<(), String> {
    let n = row.viewers;
    let room = format!("bench-migrate-{n}");
    let target = mesh.index_of(TARGET)?;
    let seoul_1 = mesh.index_of("seoul-1")?;
    let source = publisher(mesh, seoul_1, &room).await?;
    let mut publishers = vec![source];
    let result = async {
        let (host, epoch) = placement(mesh, seoul_1, &room).await?;
        row.from = host.clone();
        row.epoch_before = Some(epoch);
        if host == TARGET {
            return Err(format!("the room was placed on {host}, the migration target"));
        }
        let from = mesh.index_of(&host)?;
        let (moved, relayed) = if n > VIEWERS_PER_NODE_MAX {
            (n.div_ceil(2), n / 2)
        } else {
            (n, 0)
        };
        row.moved_viewers = moved;
        row.relayed_viewers = relayed;
        join_viewers(mesh, from, &room, 0..moved, clients).await?;
        if relayed > 0 {
            let other = (0..mesh.nodes.len())
                .find(|&i| i != from && i != target)
                .ok_or("no other seoul node")?;
            row.relay_node = Some(mesh.nodes[other].0.clone());
            row.notes.push(format!(
                "{moved} viewers on the host {host}, {relayed} on {} (160 media ports per node)",
                mesh.nodes[other].0
            ));
            join_viewers(mesh, other, &room, moved..n, clients).await?;
        }
        wait_flowing(clients)
            .await
            .map_err(|e| format!("before the migration: {e}"))?;
        row.gap_before = Spread::of(&gaps_of(clients).await);
        let sessions: Vec<String> = clients.iter().map(Client::session).collect();

        let mut watch = StallWatch::new(frames_of(clients).await);
        let url = format!("{}/admin/v1/rooms/{room}/migrate", mesh.nodes[target].2);
        let token = mesh.admin_token.clone();
        let sent = Instant::now();
        let post = tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(&url)
                .bearer_auth(token)
                .json(&json!({ "to": TARGET }))
                .timeout(MIGRATION_MAX)
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!("POST {url}: {status} {body}"))
            }
        });
        let mut post = Some(post);
        let mut answer: Option<Result<Value, String>> = None;
        // Per viewer: the frame count it must pass to count as back, and when it did.
        let mut goal: Vec<Option<u64>> = vec![None; n];
        let mut goal_at: Vec<Option<Instant>> = vec![None; n];
        let deadline = sent + MIGRATION_MAX;
        let mut frames = watch.frames.clone();
        loop {
            tokio::time::sleep(POLL).await;
            frames = poll_frames(clients, &frames).await;
            watch.update(&frames);
            let now = Instant::now();
            if answer.is_none() && post.as_ref().is_some_and(|p| p.is_finished()) {
                row.post_answered_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
                let handle = post.take().expect("checked");
                answer = Some(handle.await.map_err(|e| e.to_string()).and_then(|r| r));
                for (i, g) in goal.iter_mut().enumerate().skip(moved) {
                    *g = Some(frames[i] + NEW_FRAMES);
                }
            }
            for i in 0..moved {
                if goal[i].is_none() && clients[i].node() == TARGET {
                    goal[i] = Some(frames[i] + NEW_FRAMES);
                }
            }
            for i in 0..n {
                if goal_at[i].is_none() && goal[i].is_some_and(|g| frames[i] >= g) {
                    goal_at[i] = Some(now);
                }
            }
            // Back: past its goal and past its last stall; done once all have been back and
            // flowing (no stall now) for `FLOW_WINDOW`.
            let back_at: Option<Vec<Instant>> = (0..n)
                .map(|i| goal_at[i].map(|g| watch.recovered[i].map_or(g, |r| r.max(g))))
                .collect();
            if let Some(back_at) = back_at {
                let last = back_at.iter().copied().max().unwrap_or(sent);
                if watch.stalled_now() == 0 && now.duration_since(last) >= FLOW_WINDOW {
                    row.all_back_ms = Some(last.duration_since(sent).as_secs_f64() * 1000.0);
                    row.flowing_after = true;
                    break;
                }
            }
            if matches!(answer, Some(Err(_))) || now >= deadline {
                break;
            }
        }
        row.viewers_back = (0..n)
            .filter(|&i| goal_at[i].is_some() && now_flowing(&watch, i))
            .count();
        row.stall_polled = Spread::of(&watch.longest);
        if let Some(handle) = post.take() {
            let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
            answer = Some(match tokio::time::timeout(left, handle).await {
                Ok(joined) => joined.map_err(|e| e.to_string()).and_then(|r| r),
                Err(_) => Err(format!("no answer to the migration within {MIGRATION_MAX:?}")),
            });
            if let Some(Ok(_)) = answer {
                row.post_answered_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let gaps = gaps_of(clients).await;
        row.gap_after = Spread::of(&gaps);
        if relayed > 0 {
            row.gap_after_moved = Spread::of(&gaps[..moved]);
            row.gap_after_relayed = Spread::of(&gaps[moved..]);
        }
        row.resumed = (0..moved)
            .filter(|&i| clients[i].resumed() && clients[i].session() == sessions[i] && clients[i].node() == TARGET)
            .count();
        row.publisher_on_target = publishers[0].node() == TARGET;
        if let Ok((_, epoch)) = placement(mesh, target, &room).await {
            row.epoch_after = Some(epoch);
        }
        let moved_answer = answer.unwrap_or_else(|| Err("no answer".into()))?;
        row.admin_elapsed_ms = moved_answer["elapsed_ms"].as_u64();
        if row.all_back_ms.is_none() {
            return Err(format!(
                "{} of {n} viewers had frames again and flowed for {FLOW_WINDOW:?} within {MIGRATION_MAX:?}",
                row.viewers_back
            ));
        }
        Ok(())
    }
    .await;
    clients.append(&mut publishers);
    result
}

// ----- failover -----

#[derive(Debug, Default, serde::Serialize)]
struct FailoverRow {
    viewers: usize,
    killed: String,
    leader_before: Option<String>,
    killed_was_leader: Option<bool>,
    epoch_before: Option<u64>,
    /// Wall time from the SIGKILL until 95 % (rounded up) and all viewers had `NEW_FRAMES`
    /// frames more than at the kill.
    recovered_95_ms: Option<f64>,
    recovered_100_ms: Option<f64>,
    viewers_back: usize,
    new_host: Option<String>,
    epoch_after: Option<u64>,
    /// Viewers that got their session back (resumed) on another node.
    resumed: usize,
    reconnected: usize,
    publisher_node_after: Option<String>,
    gap_before: Option<Spread>,
    gap_after: Option<Spread>,
    /// Longest stand-still of each viewer's frame count from the kill until 2 s after all
    /// were back (or the deadline), polled every 50 ms.
    stall_polled: Option<Spread>,
    notes: Vec<String>,
    error: Option<String>,
}

async fn failover_case(
    mesh: &Mesh,
    cluster: &mut ProcessCluster,
    row: &mut FailoverRow,
    clients: &mut Vec<Client>,
) -> Result<(), String> {
    let n = row.viewers;
    let room = format!("bench-failover-{n}");
    let busan = mesh.index_of(TARGET)?;
    let via = mesh.index_of("seoul-1")?;
    row.killed = TARGET.to_string();
    let source = publisher(mesh, busan, &room).await?;
    let mut publishers = vec![source];
    let result = async {
        let (host, epoch) = placement(mesh, via, &room).await?;
        row.epoch_before = Some(epoch);
        if host != TARGET {
            return Err(format!("the room was placed on {host}, not {TARGET}"));
        }
        join_viewers(mesh, busan, &room, 0..n, clients).await?;
        wait_flowing(clients)
            .await
            .map_err(|e| format!("before the kill: {e}"))?;
        row.gap_before = Spread::of(&gaps_of(clients).await);
        let leader = tokio::task::block_in_place(|| cluster.leader());
        row.leader_before = leader.map(|i| mesh.nodes[i].0.clone());
        row.killed_was_leader = leader.map(|i| i == busan);

        let at_kill = frames_of(clients).await;
        let mut watch = StallWatch::new(at_kill.clone());
        let killed = Instant::now();
        tokio::task::block_in_place(|| cluster.kill(busan));
        let wanted = (n * 95).div_ceil(100);
        let deadline = killed + FAILOVER_MAX;
        let mut frames = at_kill.clone();
        let back = loop {
            tokio::time::sleep(POLL).await;
            frames = poll_frames(clients, &frames).await;
            watch.update(&frames);
            let back = (0..n).filter(|&i| frames[i] >= at_kill[i] + NEW_FRAMES).count();
            if back >= wanted && row.recovered_95_ms.is_none() {
                row.recovered_95_ms = Some(killed.elapsed().as_secs_f64() * 1000.0);
            }
            if back == n {
                row.recovered_100_ms = Some(killed.elapsed().as_secs_f64() * 1000.0);
                break back;
            }
            if Instant::now() >= deadline {
                break back;
            }
        };
        row.viewers_back = back;
        if row.recovered_100_ms.is_some() {
            let until = Instant::now() + FLOW_WINDOW;
            while Instant::now() < until {
                tokio::time::sleep(POLL).await;
                frames = poll_frames(clients, &frames).await;
                watch.update(&frames);
            }
        }
        row.stall_polled = Spread::of(&watch.longest);
        row.gap_after = Spread::of(&gaps_of(clients).await);
        row.resumed = clients.iter().filter(|c| c.resumed() && c.node() != TARGET).count();
        row.reconnected = clients.iter().filter(|c| c.reconnects() > 0).count();
        row.publisher_node_after = Some(publishers[0].node());
        match placement(mesh, via, &room).await {
            Ok((node, epoch)) => {
                row.new_host = Some(node);
                row.epoch_after = Some(epoch);
            }
            Err(e) => row.notes.push(format!("placement after: {e}")),
        }
        if row.recovered_100_ms.is_none() {
            return Err(format!(
                "only {back} of {n} viewers had frames again within {FAILOVER_MAX:?}"
            ));
        }
        Ok(())
    }
    .await;
    clients.append(&mut publishers);
    result
}

// ----- running the cases -----

fn start_cluster(binary: &Path) -> Result<ProcessCluster, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ProcessCluster::start(binary, &NODES, &[], CLUSTER_START_MAX)
    }))
    .map_err(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        format!("the cluster did not start: {text}")
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run_migration(args: &Args, viewers: usize) -> MigrationRow {
    let mut row = MigrationRow {
        viewers,
        ..Default::default()
    };
    println!("migration, {viewers} viewers: starting three nodes");
    let cluster = match start_cluster(&args.binary) {
        Ok(c) => c,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    let mesh = Mesh::of(&cluster);
    let runtime = runtime();
    runtime.block_on(async {
        let mut clients = Vec::new();
        if let Err(e) = migration_case(&mesh, &mut row, &mut clients).await {
            row.error = Some(e);
        }
        close_all(clients).await;
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(cluster);
    println!(
        "  from {} ({} moved, {} relayed): admin {} ms, all back after {} ms, gap before {} after {} ms, \
         polled stall {} ms, resumed {}/{}{}",
        row.from,
        row.moved_viewers,
        row.relayed_viewers,
        row.admin_elapsed_ms.map_or("-".into(), |v| v.to_string()),
        ms_cell(row.all_back_ms),
        spread_cell(row.gap_before),
        spread_cell(row.gap_after),
        spread_cell(row.stall_polled),
        row.resumed,
        row.moved_viewers,
        row.error.as_deref().map(|e| format!("; ERROR {e}")).unwrap_or_default()
    );
    row
}

fn run_failover(args: &Args, viewers: usize) -> FailoverRow {
    let mut row = FailoverRow {
        viewers,
        ..Default::default()
    };
    println!("failover, {viewers} viewers: starting three nodes");
    let mut cluster = match start_cluster(&args.binary) {
        Ok(c) => c,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    let mesh = Mesh::of(&cluster);
    let runtime = runtime();
    runtime.block_on(async {
        let mut clients = Vec::new();
        if let Err(e) = failover_case(&mesh, &mut cluster, &mut row, &mut clients).await {
            row.error = Some(e);
        }
        close_all(clients).await;
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(cluster);
    println!(
        "  killed {} (leader: {:?}): 95 % back after {} ms, all after {} ms, room now on {:?}, resumed {}/{}, \
         gap after {} ms{}",
        row.killed,
        row.killed_was_leader,
        ms_cell(row.recovered_95_ms),
        ms_cell(row.recovered_100_ms),
        row.new_host,
        row.resumed,
        viewers,
        spread_cell(row.gap_after),
        row.error.as_deref().map(|e| format!("; ERROR {e}")).unwrap_or_default()
    );
    row
}

// ----- the report -----

fn write_report(
    args: &Args,
    started: SystemTime,
    load_at_start: &str,
    migrations: &[MigrationRow],
    failovers: &[FailoverRow],
) {
    let facts = common::machine_facts();
    let (date, stamp) = common::report_time(started);
    // What is measured: the node (src, actors, cluster) and the SDK clients.
    let commit = common::git_commit(&["src", "actors", "cluster", "sdk", "proto"]);

    let mut md = String::new();
    let _ = writeln!(md, "# Mesh benchmark — {date}\n");
    let _ = writeln!(
        md,
        "- machine: {} × {} cores, {} GiB RAM; load average at start {load_at_start}; commit {commit}",
        facts.cpu_model, facts.cores, facts.memory_gib
    );
    let _ = writeln!(
        md,
        "- a fresh cluster per case: 3 `mediamesh node` processes (release) on loopback, seoul-1, seoul-2 (region \
         seoul), busan-1 (region busan), default flags (heartbeat 500 ms, dead after 3 missed), 160 media ports each"
    );
    let _ = writeln!(
        md,
        "- clients in the bench process (tokio, 2 workers): Rust SDK signal clients over WebSocket; one publisher \
         (VP8 {} kb/s, 30 fps, keyframe every {KEYFRAME_INTERVAL_FRAMES} frames, plus Opus), N viewers joined \
         {JOIN_CONCURRENCY} at a time; reconnect backoff 100–500 ms",
        VIDEO_BITRATE_BPS / 1000
    );
    let _ = writeln!(
        md,
        "- before each migration or kill every viewer had its first frame and ≥ {FLOW_FRAMES_MIN} frames in {} s; \
         frame counts polled every {} ms (a viewer whose statistics are busy for {} ms keeps its last count); \
         stall = no new frame for ≥ {} ms\n- migration \"all back\" = the latest, over the viewers, of: {NEW_FRAMES} \
         frames more than when first seen on busan-1 (relayed viewers: than when the POST was answered), and the \
         end of its last stall; the case ends once every viewer has then flowed {} s without a stall (\"flowing \
         after\"). Failover \"back\" = {NEW_FRAMES} frames more than at the kill.\n",
        FLOW_WINDOW.as_secs(),
        POLL.as_millis(),
        POLL_ONE_MAX.as_millis(),
        STALL.as_millis(),
        FLOW_WINDOW.as_secs()
    );

    let _ = writeln!(
        md,
        "## Migration to busan-1 (`POST /admin/v1/rooms/{{room}}/migrate`)\n"
    );
    let _ = writeln!(
        md,
        "| viewers | from | admin elapsed ms | POST answered ms | all back ms | gap before p50 / p99 / max ms | \
         gap after p50 / p99 / max ms | polled stall p50 / p99 / max ms | resumed | flowing after | notes |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in migrations {
        let mut notes = r.notes.clone();
        if let (Some(m), Some(rel)) = (r.gap_after_moved, r.gap_after_relayed) {
            notes.push(format!(
                "gap after: moved {} ms, relayed {} ms",
                spread_cell(Some(m)),
                spread_cell(Some(rel))
            ));
        }
        if let (Some(a), Some(b)) = (r.epoch_before, r.epoch_after) {
            notes.push(format!("epoch {a} → {b}"));
        }
        if !r.publisher_on_target && r.error.is_none() {
            notes.push("publisher NOT on busan-1".into());
        }
        if let Some(e) = &r.error {
            notes.push(format!("**error**: {e}"));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} |",
            r.viewers,
            if r.from.is_empty() { "-" } else { &r.from },
            r.admin_elapsed_ms.map_or("-".into(), |v| v.to_string()),
            ms_cell(r.post_answered_ms),
            ms_cell(r.all_back_ms),
            spread_cell(r.gap_before),
            spread_cell(r.gap_after),
            spread_cell(r.stall_polled),
            r.resumed,
            r.moved_viewers,
            if r.flowing_after { "yes" } else { "no" },
            notes.join("; ")
        );
    }
    let _ = writeln!(md, "\n## Failover: SIGKILL of the host busan-1\n");
    let _ = writeln!(
        md,
        "| viewers | killed node was store leader | 95 % back ms | 100 % back ms | room now on | resumed | \
         gap before p50 / p99 / max ms | gap after p50 / p99 / max ms | polled stall p50 / p99 / max ms | notes |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---|---:|---:|---:|---:|---|");
    for r in failovers {
        let mut notes = r.notes.clone();
        if let (Some(a), Some(b)) = (r.epoch_before, r.epoch_after) {
            notes.push(format!("epoch {a} → {b}"));
        }
        if let Some(p) = &r.publisher_node_after {
            notes.push(format!("publisher on {p}"));
        }
        notes.push(format!("{} reconnected", r.reconnected));
        if let Some(e) = &r.error {
            notes.push(format!("**error**: {e}"));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} |",
            r.viewers,
            match (r.killed_was_leader, &r.leader_before) {
                (Some(true), _) => "yes".to_string(),
                (Some(false), Some(l)) => format!("no (leader {l})"),
                _ => "unknown".to_string(),
            },
            ms_cell(r.recovered_95_ms),
            ms_cell(r.recovered_100_ms),
            r.new_host.as_deref().unwrap_or("-"),
            r.resumed,
            r.viewers,
            spread_cell(r.gap_before),
            spread_cell(r.gap_after),
            spread_cell(r.stall_polled),
            notes.join("; ")
        );
    }
    let _ = writeln!(
        md,
        "\nGap = the SDK's `frame_gap_max` per viewer: the largest time between the first packets of two consecutive \
         video frames over the viewer's whole play (so \"after\" includes \"before\"). Polled stall = the longest \
         time a viewer's frame count did not change while the bench polled every {} ms, from the POST (or the kill) \
         until the end of the case: it covers only the event (± one poll, and it includes time the SDK held the \
         viewer's statistics while reconnecting). See benches/README.md (\"mesh\").",
        POLL.as_millis()
    );

    let report = json!({
        "benchmark": "mesh",
        "date": date,
        "git_commit": commit,
        "machine": {
            "cpu_model": facts.cpu_model,
            "cores": facts.cores,
            "memory_gib": facts.memory_gib,
            "load_average_at_start": load_at_start,
        },
        "parameters": {
            "viewers": args.viewers,
            "failover_viewers": args.failover_viewers,
            "video_bitrate_bps": VIDEO_BITRATE_BPS,
            "keyframe_interval_frames": KEYFRAME_INTERVAL_FRAMES,
            "viewers_per_node_max": VIEWERS_PER_NODE_MAX,
            "new_frames": NEW_FRAMES,
            "poll_ms": POLL.as_millis() as u64,
        },
        "migration": migrations,
        "failover": failovers,
    });
    if let Err(e) = common::write_results(&args.results_dir, "mesh", &stamp, &md, &report) {
        eprintln!("cannot write the results to {}: {e}", args.results_dir.display());
        return;
    }
    println!("\n{md}");
    println!(
        "mesh: results written to {}/mesh-{stamp}.{{md,json}} and mesh-latest.{{md,json}}",
        args.results_dir.display()
    );
}

fn main() {
    let args = common::args_or_exit(parse_args());
    common::require_binary(&args.binary);
    let started = SystemTime::now();
    let load_at_start = common::load_average();
    let facts = common::machine_facts();
    println!(
        "mesh benchmark: migration with {:?} viewers, failover with {:?}; {} × {} cores, load {load_at_start}",
        args.viewers, args.failover_viewers, facts.cpu_model, facts.cores
    );
    let migrations: Vec<MigrationRow> = args.viewers.iter().map(|&n| run_migration(&args, n)).collect();
    let failovers: Vec<FailoverRow> = args.failover_viewers.iter().map(|&n| run_failover(&args, n)).collect();
    write_report(&args, started, &load_at_start, &migrations, &failovers);
    let failed = migrations.iter().filter(|r| r.error.is_some()).count()
        + failovers.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        eprintln!("mesh: {failed} case(s) failed (see the report)");
        std::process::exit(1);
    }
}
