//! The mesh with three node processes on loopback (seoul-1, seoul-2, busan-1), driven by the
//! Rust SDK: cross-region viewing through one relay stream per track, live migration through
//! the admin API, drain on SIGTERM, failover after SIGKILL, and a publish to a node that does
//! not host the room (WHIP 307, signal `moved`).

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::ProcessCluster;
use mediamesh_sdk::{Client, PlayOptions, PublishOptions, Role};
use serde_json::Value;
use std::time::{Duration, Instant};

const NODES: [(&str, &str); 3] = [("seoul-1", "seoul"), ("seoul-2", "seoul"), ("busan-1", "busan")];
const CLUSTER_START_MAX: Duration = Duration::from_secs(30);

async fn start_cluster(extra: &'static [&'static str]) -> ProcessCluster {
    tokio::task::spawn_blocking(move || {
        ProcessCluster::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_mediamesh")),
            &NODES,
            extra,
            CLUSTER_START_MAX,
        )
    })
    .await
    .expect("cluster started")
}

fn publish_options() -> PublishOptions {
    PublishOptions {
        video_bitrate_bps: 200_000,
        keyframe_interval_frames: 30,
        ..Default::default()
    }
}

async fn publisher(cluster: &ProcessCluster, node: usize, room: &str) -> Client {
    let base = cluster.nodes[node].base_url();
    let client = Client::connect(
        &base,
        &cluster::sdk_token(&cluster.secret, room, "publisher-1", Role::Publisher),
        cluster::sdk_options(room, Role::Publisher, &cluster.nodes[node].spec.region),
    )
    .await
    .unwrap_or_else(|e| panic!("publisher joins {room} at {base}: {e}"));
    client.publish(publish_options()).await.expect("publishes");
    client
}

/// `count` viewers joined at `node`, playing; each waits for its first frame.
async fn viewers(cluster: &ProcessCluster, node: usize, room: &str, count: usize) -> Vec<Client> {
    let base = cluster.nodes[node].base_url();
    let region = cluster.nodes[node].spec.region.clone();
    let joins = (0..count).map(|i| {
        let (base, region) = (base.clone(), region.clone());
        let token = cluster::sdk_token(&cluster.secret, room, &format!("viewer-{i}"), Role::Subscriber);
        let room = room.to_string();
        async move {
            let client = Client::connect(&base, &token, cluster::sdk_options(&room, Role::Subscriber, &region))
                .await
                .unwrap_or_else(|e| panic!("viewer {i} joins at {base}: {e}"));
            client.play(PlayOptions::default()).await.expect("plays");
            client
        }
    });
    let clients = futures::future::join_all(joins).await;
    for (i, client) in clients.iter().enumerate() {
        client
            .wait_first_frame(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("viewer {i} at {base}: no first frame: {e}"));
    }
    clients
}

async fn get_json(url: String, token: String) -> Value {
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.json().await.expect("JSON body")
}

/// The room's placement `(node, epoch)` as the store has it.
async fn placement(cluster: &ProcessCluster, via: usize, room: &str) -> (String, u64) {
    let url = format!("{}/admin/v1/rooms/{room}", cluster.nodes[via].base_url());
    let body = get_json(url, cluster.admin_token.clone()).await;
    let placement = &body["placement"];
    (
        placement["node"].as_str().expect("placed").to_string(),
        placement["epoch"].as_u64().expect("epoch"),
    )
}

/// One sample of a metric family with `label` (e.g. `direction="in"`), or 0.
async fn metric(cluster: &ProcessCluster, node: usize, name: &str, label: &str) -> f64 {
    let url = format!("{}/metrics", cluster.nodes[node].base_url());
    let text = reqwest::get(&url).await.expect("scrape").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn frames(client: &Client) -> u64 {
    client.play_stats().await.video.frames
}

/// Whether every viewer gets frames now (each at least `min` in `window`).
async fn all_flowing(clients: &[Client], window: Duration, min: u64) -> Result<(), String> {
    let before = futures::future::join_all(clients.iter().map(frames)).await;
    tokio::time::sleep(window).await;
    let after = futures::future::join_all(clients.iter().map(frames)).await;
    let stalled: Vec<usize> = (0..clients.len()).filter(|&i| after[i] - before[i] < min).collect();
    if stalled.is_empty() {
        Ok(())
    } else {
        Err(format!("viewers {stalled:?} got fewer than {min} frames in {window:?}"))
    }
}

/// Percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busan_viewers_watch_a_seoul_room_through_one_relay_stream_per_track() {
    let cluster = start_cluster(&[]).await;
    let room = "mesh-cross";
    let source = publisher(&cluster, 0, room).await;
    let (host, _) = placement(&cluster, 2, room).await;
    assert!(
        host.starts_with("seoul-"),
        "a publisher preferring seoul lands in seoul, not {host}"
    );
    let busan = cluster.index_of("busan-1").expect("busan-1");
    let watchers = viewers(&cluster, busan, room, 20).await;
    all_flowing(&watchers, Duration::from_secs(2), 20)
        .await
        .expect("busan viewers get frames");
    // 20 more viewers at busan-1, over WHEP, from `mediamesh loadtest`.
    let (url, secret) = (cluster.nodes[busan].base_url(), cluster.secret.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mediamesh"))
            .args([
                "loadtest",
                "--url",
                &url,
                "--room",
                room,
                "--publishers",
                "0",
                "--subscribers",
                "20",
            ])
            .args(["--duration", "3s", "--mode", "whep", "--api-secret", &secret, "--json"])
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("loadtest task")
    .expect("loadtest runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadtest: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("loadtest JSON summary");
    assert_eq!(summary["subscribers_connected"], 20, "{summary}");
    assert!(summary["frames"].as_u64().unwrap_or(0) > 20 * 30, "{summary}");
    assert!(summary["loss"].as_f64().unwrap_or(1.0) < 0.02, "{summary}");
    // One stream per track (video and audio) into busan-1, however many viewers.
    let streams_in = metric(&cluster, busan, "mediamesh_relay_streams", "direction=\"in\"").await;
    assert_eq!(streams_in, 2.0, "busan-1 pulls one stream per track");
    let host_index = cluster.index_of(&host).expect("host");
    let streams_out = metric(&cluster, host_index, "mediamesh_relay_streams", "direction=\"out\"").await;
    assert_eq!(streams_out, 2.0, "{host} serves one stream per track");
    let relayed = metric(&cluster, busan, "mediamesh_relay_packets_total", "direction=\"in\"").await;
    assert!(relayed > 100.0, "{relayed} packets relayed into busan-1");
    for client in &watchers {
        let stats = client.play_stats().await;
        assert!(stats.video.loss_fraction() < 0.02, "{stats:?}");
    }
    for client in watchers {
        client.close().await;
    }
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_node_that_does_not_host_the_room_goes_to_the_host() {
    let cluster = start_cluster(&[]).await;
    let room = "mesh-redirect";
    let source = publisher(&cluster, 0, room).await;
    let (host, epoch) = placement(&cluster, 0, room).await;
    let other = (0..3)
        .find(|&i| cluster.nodes[i].spec.id != host)
        .expect("another node");
    // WHIP: 307 to the host's WHIP URL, with the query kept.
    let url = format!("{}/whip/{room}?x=1", cluster.nodes[other].base_url());
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .post(&url)
        .bearer_auth(cluster::sdk_token(
            &cluster.secret,
            room,
            "publisher-2",
            Role::Publisher,
        ))
        .header("content-type", "application/sdp")
        .body(common::sample_offer())
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 307);
    let host_index = cluster.index_of(&host).expect("host");
    let location = response.headers()["location"].to_str().expect("ascii").to_string();
    assert_eq!(
        location,
        format!("{}/whip/{room}?x=1", cluster.nodes[host_index].base_url())
    );
    // The SDK over the signal channel follows `moved` and publishes on the host.
    let second = publisher(&cluster, other, room).await;
    let (still, same_epoch) = placement(&cluster, other, room).await;
    assert_eq!((still, same_epoch), (host.clone(), epoch), "nothing moved");
    let url = format!("{}/admin/v1/rooms/{room}", cluster.nodes[host_index].base_url());
    let info = get_json(url, cluster.admin_token.clone()).await;
    assert_eq!(info["publishers"].as_array().map(Vec::len), Some(2), "{info}");
    second.close().await;
    source.close().await;
}

async fn post_json(url: String, token: String, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token)
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn room_info(cluster: &ProcessCluster, node: usize, room: &str) -> Value {
    let url = format!("{}/admin/v1/rooms/{room}", cluster.nodes[node].base_url());
    get_json(url, cluster.admin_token.clone()).await
}

fn count(info: &Value, field: &str) -> usize {
    info[field].as_array().map_or(0, Vec::len)
}

/// Waits until `check` passes, up to `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether every client is served by `node` now.
fn all_on(clients: &[Client], node: &str) -> Result<(), String> {
    let elsewhere = clients.iter().filter(|c| c.node() != node).count();
    if elsewhere == 0 {
        Ok(())
    } else {
        Err(format!("{elsewhere} clients not on {node}"))
    }
}

/// Largest gap between video frames per viewer, sorted: p50, p99, max.
async fn gaps(clients: &[Client]) -> (Duration, Duration, Duration) {
    let mut gaps: Vec<Duration> = futures::future::join_all(clients.iter().map(|c| c.play_stats()))
        .await
        .into_iter()
        .map(|s| s.video.frame_gap_max)
        .collect();
    gaps.sort();
    (percentile(&gaps, 0.5), percentile(&gaps, 0.99), gaps[gaps.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_with_50_viewers_migrates_to_busan_and_everyone_resumes_there() {
    let cluster = start_cluster(&[]).await;
    let room = "mesh-migrate";
    let source = publisher(&cluster, 0, room).await;
    let (host, epoch) = placement(&cluster, 0, room).await;
    let from = cluster.index_of(&host).expect("host");
    let watchers = viewers(&cluster, from, room, 50).await;
    // Five more watch from the other seoul node, through its relay: they stay there and follow
    // the room to its new host.
    let relay_node = (0..2).find(|&i| i != from).expect("the other seoul node");
    let relayed = viewers(&cluster, relay_node, room, 5).await;
    let sessions: Vec<String> = watchers.iter().map(Client::session).collect();
    all_flowing(&watchers, Duration::from_secs(1), 10)
        .await
        .expect("flowing before");
    let busan = cluster.index_of("busan-1").expect("busan-1");
    let (status, moved) = post_json(
        format!("{}/admin/v1/rooms/{room}/migrate", cluster.nodes[busan].base_url()),
        cluster.admin_token.clone(),
        serde_json::json!({ "to": "busan-1" }),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["epoch"].as_u64(), Some(epoch + 1), "{moved}");
    // Everyone is on busan-1 with the same session, getting frames.
    eventually(Duration::from_secs(20), "viewers resumed on busan-1", || async {
        all_on(&watchers, "busan-1")?;
        let info = room_info(&cluster, busan, room).await;
        if count(&info, "subscribers") != 50 || count(&info, "publishers") != 1 {
            return Err(format!("busan-1 room: {info}"));
        }
        Ok(())
    })
    .await;
    for (client, session) in watchers.iter().zip(&sessions) {
        assert_eq!(&client.session(), session, "same viewer session after the move");
        assert!(client.resumed() && client.resumes() >= 1);
    }
    all_flowing(&watchers, Duration::from_secs(2), 20)
        .await
        .expect("frames after the move");
    assert_eq!(source.node(), "busan-1", "the publisher moved too");
    // The old host's media sessions outlive the move by a grace period (make-before-break), then
    // nobody is left there: no viewer holds two sessions. The epoch rose exactly once.
    eventually(Duration::from_secs(10), "the old host emptied", || async {
        let old = room_info(&cluster, from, room).await;
        if count(&old, "subscribers") == 0 && count(&old, "publishers") == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} subscribers, {} publishers left",
                count(&old, "subscribers"),
                count(&old, "publishers")
            ))
        }
    })
    .await;
    assert_eq!(
        placement(&cluster, from, room).await,
        ("busan-1".to_string(), epoch + 1)
    );
    all_flowing(&relayed, Duration::from_secs(2), 20)
        .await
        .expect("relayed viewers follow the room");
    let (p50, p99, max) = gaps(&watchers).await;
    let (_, _, relayed_max) = gaps(&relayed).await;
    println!(
        "migration of 50 viewers: {} ms; media gap per viewer p50 {p50:?} p99 {p99:?} max {max:?}; 5 relayed viewers elsewhere: max {relayed_max:?}",
        moved["elapsed_ms"]
    );
    assert!(p99 < Duration::from_secs(3), "p99 media gap {p99:?}");
    assert!(
        relayed_max < Duration::from_secs(3),
        "relayed viewers' gap {relayed_max:?}"
    );
    for client in watchers.into_iter().chain(relayed) {
        client.close().await;
    }
    source.close().await;
}

/// Viewers whose frame count passed `since[i]` by at least a few frames.
async fn recovered(clients: &[Client], since: &[u64]) -> usize {
    let now = futures::future::join_all(clients.iter().map(frames)).await;
    now.iter()
        .zip(since)
        .filter(|(now, since)| **now >= **since + 5)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_of_a_killed_host_resume_on_the_node_that_takes_its_room() {
    let mut cluster = start_cluster(&[]).await;
    let room = "mesh-failover";
    // Preferring busan, the room lives on busan-1. When busan-1 also leads the store, an election
    // comes on top of the failure detector's time (printed below).
    let host_index = cluster.index_of("busan-1").expect("busan-1");
    let leader = tokio::task::block_in_place(|| cluster.leader()).expect("a leader");
    let source = publisher(&cluster, host_index, room).await;
    let via = (0..3).find(|&i| i != host_index).expect("another node");
    let (host, epoch) = placement(&cluster, via, room).await;
    assert_eq!(host, "busan-1");
    let watchers = viewers(&cluster, host_index, room, 50).await;
    all_flowing(&watchers, Duration::from_secs(1), 10)
        .await
        .expect("flowing before");
    let at_kill = futures::future::join_all(watchers.iter().map(frames)).await;
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(host_index));
    let wanted = watchers.len() * 95 / 100;
    let mut recovered_after = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if recovered(&watchers, &at_kill).await >= wanted {
            recovered_after = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = recovered(&watchers, &at_kill).await;
    let recovered_after =
        recovered_after.unwrap_or_else(|| panic!("only {back} of 50 viewers got frames again within 30 s"));
    let (new_host, new_epoch) = placement(&cluster, via, room).await;
    assert_ne!(new_host, host, "the room was re-placed");
    assert!(new_epoch > epoch);
    let sessions_kept = watchers.iter().filter(|c| c.resumed()).count();
    println!(
        "failover: 95% of 50 viewers had frames again {recovered_after:?} after SIGKILL of {host} (the store leader: {}); room now on {new_host} (epoch {epoch} -> {new_epoch}); {sessions_kept} resumed their session",
        leader == host_index
    );
    assert!(sessions_kept >= wanted, "{sessions_kept} viewers resumed their session");
    for client in watchers {
        client.close().await;
    }
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_hosting_three_rooms_and_it_exits_0() {
    let mut cluster = start_cluster(&[]).await;
    let busan = cluster.index_of("busan-1").expect("busan-1");
    let rooms = ["mesh-drain-a", "mesh-drain-b", "mesh-drain-c"];
    let mut publishers = Vec::new();
    let mut watchers = Vec::new();
    for room in rooms {
        // Preferring busan, the only busan node hosts all three rooms.
        publishers.push(publisher(&cluster, busan, room).await);
        assert_eq!(placement(&cluster, 0, room).await.0, "busan-1");
        watchers.extend(viewers(&cluster, busan, room, 3).await);
    }
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| cluster.terminate(busan, Duration::from_secs(40)));
    let took = started.elapsed();
    let status = status.expect("busan-1 exited within its drain deadline");
    assert!(status.success(), "busan-1 exited with {status}");
    println!("drain of 3 rooms (3 publishers, 9 viewers): the process exited 0 after {took:?}");
    assert!(took < Duration::from_secs(30), "drained in {took:?}");
    for room in rooms {
        let (node, _) = placement(&cluster, 0, room).await;
        assert_ne!(node, "busan-1", "{room} moved off busan-1");
    }
    eventually(Duration::from_secs(10), "everyone moved to seoul", || async {
        let left = publishers
            .iter()
            .chain(&watchers)
            .filter(|c| c.node() == "busan-1")
            .count();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} clients still on busan-1"))
        }
    })
    .await;
    all_flowing(&watchers, Duration::from_secs(2), 20)
        .await
        .expect("frames after the drain");
    // busan-1 left the cluster.
    let status = get_json(
        format!("{}/admin/v1/cluster", cluster.nodes[0].base_url()),
        cluster.admin_token.clone(),
    )
    .await;
    let ids: Vec<&str> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert!(!ids.contains(&"busan-1"), "{ids:?}");
    for client in watchers.into_iter().chain(publishers) {
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_away_10_s_resumes_one_away_40_s_starts_over_and_its_state_expires() {
    // The default 30 s resume window; the viewer state lives 45 s after its last update.
    let cluster = start_cluster(&["--viewer-ttl-ms", "45000"]).await;
    let room = "mesh-resume";
    let source = publisher(&cluster, 0, room).await;
    let busan = cluster.index_of("busan-1").expect("busan-1");
    let mut pair = viewers(&cluster, busan, room, 2).await;
    let long = pair.pop().expect("second viewer");
    let short = pair.pop().expect("first viewer");
    let (short_session, long_session) = (short.session(), long.session());
    let mut short_events = short.events();
    let mut long_events = long.events();
    short.cut(Duration::from_secs(10)).await.expect("cut");
    long.cut(Duration::from_secs(40)).await.expect("cut");
    let cut_at = Instant::now();
    let reconnected = |events: &mut tokio::sync::broadcast::Receiver<mediamesh_sdk::Event>| {
        let mut events = events.resubscribe();
        async move {
            loop {
                match events.recv().await {
                    Ok(mediamesh_sdk::Event::Reconnected { resumed, session }) => return (resumed, session),
                    Ok(_) => {}
                    Err(e) => panic!("events: {e}"),
                }
            }
        }
    };
    let (resumed, session) = tokio::time::timeout(Duration::from_secs(20), reconnected(&mut short_events))
        .await
        .expect("the short cut reconnects");
    assert!(resumed && session == short_session, "10 s away: same session back");
    let (resumed, session) = tokio::time::timeout(Duration::from_secs(50), reconnected(&mut long_events))
        .await
        .expect("the long cut reconnects");
    assert!(!resumed && session != long_session, "40 s away: a new session");
    assert!(cut_at.elapsed() >= Duration::from_secs(40));
    all_flowing(&[short, long], Duration::from_secs(1), 10)
        .await
        .expect("both watch again");
    // The abandoned state expires 45 s after its last write (the cut), on every node alike.
    let url = |i: usize| format!("{}/admin/v1/viewers/{long_session}", cluster.nodes[i].base_url());
    eventually(
        Duration::from_secs(15),
        "the abandoned viewer state expired",
        || async {
            for i in 0..3 {
                let response = reqwest::Client::new()
                    .get(url(i))
                    .bearer_auth(&cluster.admin_token)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if response.status() != 404 {
                    return Err(format!("node {i}: {}", response.status()));
                }
            }
            Ok(())
        },
    )
    .await;
    let expired_after = cut_at.elapsed();
    println!(
        "resume: 10 s away resumed, 40 s away started over; state gone {expired_after:?} after the cut (TTL 45 s)"
    );
    assert!(
        expired_after >= Duration::from_secs(44),
        "expired early: {expired_after:?}"
    );
    source.close().await;
}

async fn set_partition(cluster: &ProcessCluster, node: usize, block: &[&str]) {
    let url = format!("{}/admin/v1/test/partition", cluster.nodes[node].base_url());
    let client = reqwest::Client::new();
    let response = if block.is_empty() {
        client.delete(&url).bearer_auth(&cluster.admin_token).send().await
    } else {
        client
            .post(&url)
            .bearer_auth(&cluster.admin_token)
            .json(&serde_json::json!({ "block": block }))
            .send()
            .await
    }
    .unwrap_or_else(|e| panic!("partition {url}: {e}"));
    assert!(response.status().is_success(), "partition {url}: {}", response.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_majority_loses_its_room_and_stops_after_healing() {
    let cluster = start_cluster(&["--test-faults"]).await;
    let room = "mesh-split";
    let busan = cluster.index_of("busan-1").expect("busan-1");
    let source = publisher(&cluster, busan, room).await;
    let (host, epoch) = placement(&cluster, 0, room).await;
    assert_eq!(host, "busan-1");
    let watchers = viewers(&cluster, busan, room, 10).await;
    // Cut busan-1 off from both seoul nodes, both ways.
    set_partition(&cluster, busan, &["seoul-1", "seoul-2"]).await;
    set_partition(&cluster, 0, &["busan-1"]).await;
    set_partition(&cluster, 1, &["busan-1"]).await;
    // The majority declares busan-1 dead and re-places the room in seoul.
    eventually(Duration::from_secs(15), "the majority re-placed the room", || async {
        let (node, new_epoch) = placement(&cluster, 0, room).await;
        if node != "busan-1" && new_epoch > epoch {
            Ok(())
        } else {
            Err(format!("still {node} epoch {new_epoch}"))
        }
    })
    .await;
    let (new_host, new_epoch) = placement(&cluster, 0, room).await;
    assert_eq!(new_epoch, epoch + 1, "one re-placement");
    // The cut-off host does not know yet: it still hosts, its viewers still watch it.
    let stale = room_info(&cluster, busan, room).await;
    assert_eq!(stale["hosted"], true, "{stale}");
    all_flowing(&watchers, Duration::from_secs(1), 10)
        .await
        .expect("the isolated host still serves its viewers");
    let healed_at = Instant::now();
    for node in 0..3 {
        set_partition(&cluster, node, &[]).await;
    }
    // After healing, busan-1 sees its stale epoch: it stops hosting, its clients move.
    eventually(Duration::from_secs(15), "busan-1 stepped down", || async {
        let info = room_info(&cluster, busan, room).await;
        if info["hosted"] == false && count(&info, "subscribers") == 0 && count(&info, "publishers") == 0 {
            Ok(())
        } else {
            Err(format!("busan-1: {info}"))
        }
    })
    .await;
    let stepped_down = healed_at.elapsed();
    eventually(Duration::from_secs(15), "everyone on the new host", || async {
        all_on(&watchers, &new_host)?;
        all_on(std::slice::from_ref(&source), &new_host)
    })
    .await;
    all_flowing(&watchers, Duration::from_secs(2), 20)
        .await
        .expect("frames from the new host");
    // One host per epoch: the directory did not move again, and only the new host hosts.
    assert_eq!(placement(&cluster, busan, room).await, (new_host.clone(), new_epoch));
    let hosts: Vec<usize> = {
        let mut hosts = Vec::new();
        for i in 0..3 {
            let url = format!("{}/admin/v1/rooms/{room}", cluster.nodes[i].base_url());
            let info = get_json(url, cluster.admin_token.clone()).await;
            if info["hosted"] == true {
                hosts.push(i);
            }
        }
        hosts
    };
    assert_eq!(
        hosts,
        vec![cluster.index_of(&new_host).expect("new host")],
        "exactly one host"
    );
    println!(
        "split brain: room re-placed on {new_host} (epoch {epoch} -> {new_epoch}); busan-1 stepped down {stepped_down:?} after healing"
    );
    for client in watchers {
        client.close().await;
    }
    source.close().await;
}
