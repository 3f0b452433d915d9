//! What operators see, against real node processes: names with Hangul are kept and shown only
//! masked (store, admin API), and the usage ledger splits a viewer's time at KST midnight.

mod common;

use common::TestNode;
use mediamesh::auth::Grants;
use mediamesh_sdk::{Client, ClientOptions, PlayOptions, PublishOptions, Role};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

async fn start_node(extra: Vec<String>) -> TestNode {
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        TestNode::start(&extra)
    })
    .await
    .expect("node started")
}

fn grants(role: Role) -> Grants {
    Grants {
        publish: role != Role::Subscriber,
        subscribe: role != Role::Publisher,
        admin: false,
    }
}

/// An SDK client of `room` whose token subject is `identity`.
async fn join(node: &TestNode, room: &str, identity: &str, role: Role, display_name: &str) -> Client {
    let token = node.keys.create(identity, room, grants(role), Duration::from_secs(600));
    let options = ClientOptions {
        room: room.to_string(),
        role,
        display_name: display_name.to_string(),
        position_interval: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    Client::connect(&node.base, &token, options)
        .await
        .unwrap_or_else(|e| panic!("{identity} joins {room}: {e}"))
}

async fn admin(node: &TestNode, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", node.base))
        .bearer_auth(node.admin_token());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn admin_json(node: &TestNode, path: &str) -> Value {
    let (status, body) = admin(node, reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Whether any file under `dir` contains `needle`'s bytes.
fn found_in_files(dir: &Path, needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            return found_in_files(&path, needle);
        }
        std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    })
}

const NAME: &str = "김민수";
const DISPLAY: &str = "김민수 010-1234-5678";
const PHONE: &str = "010-1234-5678";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_with_hangul_are_kept_and_shown_only_masked() {
    let node = start_node(Vec::new()).await;
    let room = "mask-room";
    let publisher = join(&node, room, NAME, Role::Publisher, DISPLAY).await;
    publisher.publish(PublishOptions::default()).await.expect("publishes");
    let viewer = join(&node, room, NAME, Role::Subscriber, DISPLAY).await;
    viewer.play(PlayOptions::default()).await.expect("plays");
    viewer.wait_first_frame(Duration::from_secs(10)).await.expect("frames");
    let viewer_id = viewer.session().to_string();

    // The store: the viewer state the signal session wrote.
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = loop {
        let (status, body) = admin(
            &node,
            reqwest::Method::GET,
            &format!("/admin/v1/viewers/{viewer_id}"),
            None,
        )
        .await;
        if status == 200 {
            break serde_json::from_str::<Value>(&body).expect("JSON");
        }
        assert!(Instant::now() < deadline, "no viewer state: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state["display_name"], "Kim*Su 010-****-5678", "{state}");

    // The admin API: identities in the room, publisher names in the room list.
    let (status, body) = admin(&node, reqwest::Method::GET, &format!("/admin/v1/rooms/{room}"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(NAME) && !body.contains(PHONE), "raw name in {body}");
    let view: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(view["publishers"][0]["identity"], "Kim*Su", "{view}");
    assert_eq!(view["subscribers"][0]["identity"], "Kim*Su", "{view}");
    let (_, body) = admin(&node, reqwest::Method::GET, "/admin/v1/rooms", None).await;
    assert!(!body.contains(NAME), "raw name in {body}");
    let rooms: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        rooms["rooms"][0]["nodes"][0]["publisher_names"],
        json!(["Kim*Su"]),
        "{rooms}"
    );

    // An operator's write is masked before it is stored.
    let (status, body) = admin(
        &node,
        reqwest::Method::PUT,
        "/admin/v1/viewers/written-by-ops",
        Some(json!({ "room": room, "display_name": "이영희" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"display_name\":\"Lee*Hui\""), "{body}");

    // Nothing raw on disk: neither the log nor the state machine has it.
    tokio::time::sleep(Duration::from_secs(2)).await; // sled flushes every 500 ms
    for raw in [NAME, "이영희", PHONE] {
        assert!(
            !found_in_files(&node.data_dir, raw),
            "{raw:?} persisted in {}",
            node.data_dir.display()
        );
    }
    assert!(
        found_in_files(&node.data_dir, "Kim*Su 010-****-5678"),
        "the masked name was persisted (the scan reads what the store wrote)"
    );
    viewer.close().await;
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_masking_off_names_are_kept_as_given() {
    let node = start_node(vec!["--mask-names".into(), "false".into()]).await;
    let (status, body) = admin(
        &node,
        reqwest::Method::PUT,
        "/admin/v1/viewers/raw-name",
        Some(json!({ "room": "raw-room", "display_name": NAME })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored = admin_json(&node, "/admin/v1/viewers/raw-name").await;
    assert_eq!(stored["display_name"], NAME, "{stored}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        found_in_files(&node.data_dir, NAME),
        "the scan of the data dir finds what is stored"
    );
}

/// Milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn viewer_time_across_kst_midnight_is_split_between_the_two_days() {
    // The node's usage clock stands 8 s before the next KST midnight when the test starts.
    let now = wall_ms();
    let midnight = mediamesh::clock::next_kst_midnight(now + 60_000);
    let offset = midnight as i64 - now as i64 - 8_000;
    let node_clock = move || (wall_ms() as i64 + offset) as u64;
    let node = start_node(vec![
        "--test-clock-offset-ms".into(),
        offset.to_string(),
        "--usage-flush-ms".into(),
        "300".into(),
    ])
    .await;
    let room = "usage-room";
    let publisher = join(&node, room, "streamer", Role::Publisher, "").await;
    publisher.publish(PublishOptions::default()).await.expect("publishes");
    let viewer = join(&node, room, "watcher", Role::Subscriber, "").await;
    viewer.play(PlayOptions::default()).await.expect("plays");
    let started = node_clock();
    assert!(
        started < midnight,
        "the viewer started before midnight ({} ms late)",
        started - midnight
    );
    while node_clock() < midnight + 3_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    viewer.close().await;
    let ended = node_clock();
    let before_day = mediamesh::clock::kst_day(midnight - 1);
    let after_day = mediamesh::clock::kst_day(midnight);
    assert_ne!(before_day, after_day);

    // Both days have the room; together they hold the session's time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (before, after) = loop {
        let before = admin_json(&node, &format!("/admin/v1/usage?day={before_day}")).await;
        let after = admin_json(&node, &format!("/admin/v1/usage?day={after_day}")).await;
        let ms = |day: &Value| day["rooms"][0]["viewer_ms"].as_u64().unwrap_or(0);
        if ms(&before) + ms(&after) + 1_500 >= ended - started {
            break (before, after);
        }
        assert!(Instant::now() < deadline, "usage not flushed: {before} {after}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for day in [&before, &after] {
        let rooms = day["rooms"].as_array().expect("rooms");
        assert_eq!(rooms.len(), 1, "{day}");
        assert_eq!(rooms[0]["room"], room);
        assert_eq!(rooms[0]["sessions"], 1, "one session touched each day: {day}");
    }
    let before_ms = before["rooms"][0]["viewer_ms"].as_u64().expect("ms");
    let after_ms = after["rooms"][0]["viewer_ms"].as_u64().expect("ms");
    // Before midnight: from the viewer's start to midnight; after: midnight to the close.
    let expect_before = midnight - started;
    let expect_after = ended - midnight;
    assert!(
        before_ms.abs_diff(expect_before) < 1_500,
        "{before_ms} ms before, expected ~{expect_before}"
    );
    assert!(
        after_ms.abs_diff(expect_after) < 1_500,
        "{after_ms} ms after, expected ~{expect_after}"
    );
    assert_eq!(before["day"], before_day.as_str());
    let minutes = before["total_viewer_minutes"].as_f64().expect("minutes");
    assert!((minutes - before_ms as f64 / 60_000.0).abs() < 1e-9, "{before}");
    // Days are KST calendar days: a malformed or impossible day is a 400 problem.
    for bad in ["2026-02-30", "yesterday", ""] {
        let (status, body) = admin(&node, reqwest::Method::GET, &format!("/admin/v1/usage?day={bad}"), None).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = admin(&node, reqwest::Method::GET, "/admin/v1/usage", None).await;
    assert_eq!(status, 400);
    publisher.close().await;
}
