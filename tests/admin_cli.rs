//! `mediamesh admin` against three node processes (n1 and n2 in seoul, n3 in busan), run as the
//! operator runs it: every subcommand's table and `--json`, a migration and a drain through the
//! CLI, the token it mints from the API secret, and its exit codes (1 when the API refuses, 2 for
//! an unreachable node or bad arguments).

#[path = "common/cluster.rs"]
mod cluster;

use cluster::ProcessCluster;
use mediamesh_sdk::{Client, PlayOptions, PublishOptions, Role};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODES: [(&str, &str); 3] = [("n1", "seoul"), ("n2", "seoul"), ("n3", "busan")];
const CLUSTER_START_MAX: Duration = Duration::from_secs(30);
const FIRST_FRAME_MAX: Duration = Duration::from_secs(20);
/// A drained node with nothing to move leaves the cluster and stops well within this.
const DRAIN_GONE_MAX: Duration = Duration::from_secs(30);
const ROOM: &str = "admin-cli-room";
const VIEWER: &str = "admin-cli-viewer";
const POSITION_MS: u64 = 83_456;

/// `mediamesh admin <args>` run in `dir` with no `MEDIAMESH_*` variable of the caller's.
fn admin_in(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mediamesh"));
    command.arg("admin").args(args).current_dir(dir).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MEDIAMESH_") {
            command.env_remove(name);
        }
    }
    tokio::task::block_in_place(|| command.output()).expect("mediamesh admin runs")
}

fn show(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The CLI pointed at one node of the cluster with its admin token.
struct Admin<'a> {
    cluster: &'a ProcessCluster,
}

impl Admin<'_> {
    fn at(&self, node: usize, args: &[&str]) -> Output {
        let url = self.cluster.nodes[node].base_url();
        let mut all = args.to_vec();
        all.extend(["--url", &url, "--token", &self.cluster.admin_token]);
        admin_in(&self.cluster.root, &all)
    }

    /// Exit 0; its stdout.
    fn ok(&self, node: usize, args: &[&str]) -> String {
        let output = self.at(node, args);
        assert_eq!(output.status.code(), Some(0), "admin {args:?}: {}", show(&output));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        // Shown when the test fails (and with --nocapture).
        println!(
            "$ mediamesh admin {} --url <{}>\n{stdout}",
            args.join(" "),
            self.cluster.nodes[node].spec.id
        );
        stdout
    }

    /// With `--json`: exit 0 and stdout is one JSON document.
    fn json(&self, node: usize, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let stdout = self.ok(node, &all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("admin {all:?}: not one JSON document: {e}\n{stdout}"))
    }
}

/// The rows of the table whose header starts with `first_column`, split at whitespace (so a
/// cell with a space spans two fields; only the leading columns are read that way).
fn rows(stdout: &str, first_column: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip_while(|line| line.split_whitespace().next() != Some(first_column))
        .skip(1)
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("warning:"))
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn get_json(url: &str, token: &str) -> Value {
    tokio::task::block_in_place(|| {
        let response = reqwest::blocking::Client::new()
            .get(url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status(), 200, "GET {url}");
        response.json().expect("JSON body")
    })
}

/// (room, host) of every room in a `GET /admin/v1/rooms` body.
fn room_hosts(body: &Value) -> BTreeSet<(String, String)> {
    body["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("no rooms list: {body}"))
        .iter()
        .map(|room| {
            let name = |value: &Value| value.as_str().unwrap_or("-").to_string();
            (name(&room["room"]), name(&room["node"]))
        })
        .collect()
}

async fn start_cluster() -> ProcessCluster {
    tokio::task::spawn_blocking(|| {
        ProcessCluster::start(
            Path::new(env!("CARGO_BIN_EXE_mediamesh")),
            &NODES,
            &[],
            CLUSTER_START_MAX,
        )
    })
    .await
    .expect("cluster started")
}

/// A publisher preferring busan: the room is placed on n3, the only busan node.
async fn publisher(cluster: &ProcessCluster, node: usize) -> Client {
    let spec = &cluster.nodes[node].spec;
    let client = Client::connect(
        &cluster.nodes[node].base_url(),
        &cluster::sdk_token(&cluster.secret, ROOM, "publisher-1", Role::Publisher),
        cluster::sdk_options(ROOM, Role::Publisher, &spec.region),
    )
    .await
    .unwrap_or_else(|e| panic!("publisher joins at {}: {e}", spec.id));
    client
        .publish(PublishOptions {
            video_bitrate_bps: 200_000,
            keyframe_interval_frames: 30,
            ..Default::default()
        })
        .await
        .expect("publishes");
    client
}

/// One viewer at `node`, watching through that node's relay; waits for its first frame.
async fn viewer(cluster: &ProcessCluster, node: usize) -> Client {
    let spec = &cluster.nodes[node].spec;
    let client = Client::connect(
        &cluster.nodes[node].base_url(),
        &cluster::sdk_token(&cluster.secret, ROOM, "viewer-1", Role::Subscriber),
        cluster::sdk_options(ROOM, Role::Subscriber, &spec.region),
    )
    .await
    .unwrap_or_else(|e| panic!("viewer joins at {}: {e}", spec.id));
    client.play(PlayOptions::default()).await.expect("plays");
    client
        .wait_first_frame(FIRST_FRAME_MAX)
        .await
        .unwrap_or_else(|e| panic!("viewer at {}: no first frame: {e}", spec.id));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_shows_the_cluster_moves_a_room_drains_a_node_and_exits_with_clear_codes() {
    let started = Instant::now();
    let mut cluster = start_cluster().await;
    let (n1, n2, n3) = (0, 1, 2);
    let admin = Admin { cluster: &cluster };

    // cluster: every node with its region, exactly one leader (the summary's).
    let out = admin.ok(n2, &["cluster"]);
    let table = rows(&out, "ID");
    let listed: BTreeSet<(String, String)> = table.iter().map(|row| (row[0].clone(), row[1].clone())).collect();
    let expected: BTreeSet<(String, String)> = NODES.iter().map(|(id, r)| (id.to_string(), r.to_string())).collect();
    assert_eq!(listed, expected, "{out}");
    let leaders: Vec<&str> = table
        .iter()
        .filter(|row| row.get(3).map(String::as_str) == Some("leader"))
        .map(|row| row[0].as_str())
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {out}");
    assert!(out.starts_with(&format!("leader {} ", leaders[0])), "{out}");
    let status = admin.json(n2, &["cluster"]);
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(3), "{status}");
    assert_eq!(status["leader"], leaders[0], "{status}");

    // Without --token it mints one from the API secret: the flag, or a data directory.
    let url = cluster.nodes[n1].base_url();
    let output = admin_in(
        &cluster.root,
        &["cluster", "--url", &url, "--api-secret", &cluster.secret],
    );
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));
    let data_dir = cluster.root.join("operator-data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    std::fs::write(data_dir.join("api-secret"), format!("{}\n", cluster.secret)).expect("secret");
    let data_dir = data_dir.display().to_string();
    let output = admin_in(&cluster.root, &["rooms", "--url", &url, "--data-dir", &data_dir]);
    assert_eq!(output.status.code(), Some(0), "{}", show(&output));

    // rooms: a room hosted on n3, watched at n1 through its relay.
    let source = publisher(&cluster, n3).await;
    let watcher = viewer(&cluster, n1).await;
    assert_eq!(
        watcher.node(),
        "n1",
        "the viewer stays at n1 and watches through its relay"
    );
    let out = admin.ok(n1, &["rooms"]);
    let row = rows(&out, "ROOM")
        .into_iter()
        .find(|row| row[0] == ROOM)
        .unwrap_or_else(|| panic!("{ROOM} listed: {out}"));
    assert_eq!(
        (row[1].as_str(), row[2].as_str()),
        ("n3", "busan"),
        "host and region: {out}"
    );
    let nodes = row[6..].join(" ");
    assert!(
        nodes.contains("n3*:") && nodes.contains("n1:1"),
        "the host starred, n1's viewer counted: {out}"
    );
    let listed = admin.json(n1, &["rooms"]);
    let direct = get_json(&format!("{url}/admin/v1/rooms"), &cluster.admin_token);
    assert_eq!(room_hosts(&listed), room_hosts(&direct), "{listed}\n{direct}");
    assert!(room_hosts(&listed).contains(&(ROOM.into(), "n3".into())), "{listed}");

    // room R, then migrate it to n2 through n1.
    let out = admin.ok(n1, &["room", ROOM]);
    assert!(out.starts_with(&format!("room {ROOM}: hosted by n3 (epoch ")), "{out}");
    let sessions = rows(&out, "SESSION");
    assert!(
        sessions
            .iter()
            .any(|row| row[1] == "subscriber" && row[2] == "viewer-1"),
        "n1's viewer session: {out}"
    );
    let out = admin.ok(n3, &["room", ROOM]);
    assert!(
        rows(&out, "SESSION")
            .iter()
            .any(|row| row[1] == "publisher" && row[2] == "publisher-1"),
        "the host's publisher session: {out}"
    );
    let before = admin.json(n1, &["room", ROOM]);
    assert_eq!(before["placement"]["node"], "n3", "{before}");
    let epoch = before["placement"]["epoch"].as_u64().expect("epoch");
    let out = admin.ok(n1, &["migrate", ROOM, "--to", "n2"]);
    let moved = format!("moved {ROOM} from n3 to n2 (epoch {}) in ", epoch + 1);
    assert!(out.starts_with(&moved) && out.ends_with(" ms\n"), "{out}");
    // The source (n3) remembers it; any node lists it.
    let out = admin.ok(n2, &["migrations"]);
    assert!(
        rows(&out, "ROOM")
            .iter()
            .any(|row| row[0] == ROOM && row[1] == "n3" && row[2] == "n2" && row[3] == "moved"),
        "{out}"
    );
    let after = admin.json(n1, &["room", ROOM]);
    assert_eq!(after["placement"]["node"], "n2", "{after}");
    assert_eq!(after["placement"]["epoch"], epoch + 1, "{after}");

    // viewer: a state written through the API, read through the CLI on another node.
    let put = tokio::task::block_in_place(|| {
        reqwest::blocking::Client::new()
            .put(format!("{url}/admin/v1/viewers/{VIEWER}"))
            .bearer_auth(&cluster.admin_token)
            .json(&json!({ "room": ROOM, "position_ms": POSITION_MS, "subscriptions": [], "layers": {} }))
            .timeout(Duration::from_secs(10))
            .send()
            .expect("PUT viewer")
    });
    assert_eq!(put.status(), 200, "PUT /admin/v1/viewers/{VIEWER}");
    let out = admin.ok(n2, &["viewer", VIEWER]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("room ") && l.ends_with(&format!(" {ROOM}"))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("position ") && l.contains(&POSITION_MS.to_string())),
        "{out}"
    );
    let output = admin.at(n2, &["viewer", "nobody-watches-this"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(stderr.starts_with("error: 404 Not Found"), "{}", show(&output));
    assert!(output.stdout.is_empty(), "{}", show(&output));

    // Errors: an API refusal exits 1, an unreachable node and bad arguments exit 2.
    let output = admin_in(&cluster.root, &["cluster", "--url", &url, "--token", "not-a-token"]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("401"),
        "{}",
        show(&output)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let output = admin_in(
        &cluster.root,
        &[
            "cluster",
            "--url",
            &format!("http://127.0.0.1:{closed}"),
            "--token",
            "t",
        ],
    );
    assert_eq!(output.status.code(), Some(2), "closed port: {}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot reach"),
        "{}",
        show(&output)
    );
    for args in [
        &["migrate", ROOM][..],
        &[][..],
        &["usage", "--day", "tomorrow"][..],
        &["room"][..],
    ] {
        let output = admin.at(n1, args);
        assert_eq!(output.status.code(), Some(2), "admin {args:?}: {}", show(&output));
        assert!(output.stdout.is_empty(), "admin {args:?}: {}", show(&output));
    }
    // No token and no secret anywhere (an empty working directory, no variables): exit 2.
    let empty = cluster.root.join("empty");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let output = admin_in(&empty, &["cluster", "--url", &url]);
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--token"),
        "{}",
        show(&output)
    );
    assert!(!empty.join("mediamesh-data").exists(), "no secret was generated");

    // usage of today in KST (the day the room was watched).
    let today = mediamesh::clock::kst_day(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64,
    );
    let out = admin.ok(n1, &["usage", "--day", &today]);
    assert!(out.contains("ROOM") && out.contains("total"), "{out}");
    let usage = admin.json(n1, &["usage", "--day", &today]);
    assert!(usage["rooms"].is_array(), "{usage}");

    // drain n3 last: it leaves the cluster and stops.
    let out = admin.ok(n1, &["drain", "n3"]);
    assert_eq!(out, "draining n3\n");
    let deadline = Instant::now() + DRAIN_GONE_MAX;
    loop {
        // Polled quietly: `admin.json` would print every answer.
        let output = admin.at(n1, &["cluster", "--json"]);
        assert_eq!(output.status.code(), Some(0), "{}", show(&output));
        let status: Value = serde_json::from_slice(&output.stdout).expect("one JSON document");
        let listed = status["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["id"] == "n3"));
        if !listed {
            break;
        }
        assert!(Instant::now() < deadline, "n3 still listed after its drain: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = admin.ok(n1, &["cluster"]);
    assert!(rows(&out, "ID").iter().all(|row| row[0] != "n3"), "{out}");
    let stopped_by = Instant::now() + DRAIN_GONE_MAX;
    while cluster.nodes[n3].is_running() {
        assert!(Instant::now() < stopped_by, "n3 did not stop after its drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    watcher.close().await;
    source.close().await;
    println!("admin CLI test: {:?}", started.elapsed());
}
