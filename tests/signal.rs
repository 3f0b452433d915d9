//! The signal channel as the Rust SDK uses it, against a real node process: publish and play
//! over WebSocket and gRPC in both pairings, mute, resume within and after the window.

mod common;

use common::TestNode;
use mediamesh_sdk::{Client, ClientOptions, PlayOptions, PublishOptions, Role, Transport};
use std::time::Duration;

/// Joins `room` over `transport` with a token for `role`.
async fn join(node: &TestNode, room: &str, role: Role, transport: Transport) -> Client {
    let grants = mediamesh::auth::Grants {
        publish: role != Role::Subscriber,
        subscribe: role != Role::Publisher,
        admin: false,
    };
    let token = node.token(room, grants);
    Client::connect(&node.base, &token, options(room, role, transport))
        .await
        .unwrap_or_else(|e| panic!("{role:?} joins {room} over {transport:?}: {e}"))
}

/// The node helper waits with blocking HTTP: off the async threads.
async fn start_node(extra: &'static [&'static str]) -> TestNode {
    tokio::task::spawn_blocking(move || TestNode::start(extra))
        .await
        .expect("node started")
}

fn options(room: &str, role: Role, transport: Transport) -> ClientOptions {
    ClientOptions {
        transport,
        room: room.to_string(),
        role,
        display_name: "김민수".into(),
        position_interval: Some(Duration::from_millis(300)),
        backoff_initial: Duration::from_millis(100),
        ..Default::default()
    }
}

fn publish_options() -> PublishOptions {
    PublishOptions {
        video_bitrate_bps: 300_000,
        keyframe_interval_frames: 30,
        ..Default::default()
    }
}

async fn video_frames(client: &Client) -> u64 {
    client.play_stats().await.video.frames
}

/// Frames arriving at the viewer over `window`.
async fn frames_during(client: &Client, window: Duration) -> u64 {
    let before = video_frames(client).await;
    tokio::time::sleep(window).await;
    video_frames(client).await - before
}

async fn publish_and_play(node: &TestNode, room: &str, publisher: Transport, viewer: Transport) {
    let source = join(node, room, Role::Publisher, publisher).await;
    source.publish(publish_options()).await.expect("publishes");
    let sink = join(node, room, Role::Subscriber, viewer).await;
    assert!(!sink.session().is_empty() && !sink.resume_token().is_empty());
    sink.play(PlayOptions::default()).await.expect("plays");
    let latency = sink
        .wait_first_frame(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{publisher:?} → {viewer:?}: no first frame: {e}"));
    let flowing = frames_during(&sink, Duration::from_secs(1)).await;
    assert!(
        flowing >= 20,
        "{publisher:?} → {viewer:?}: {flowing} frames in 1 s (30 fps sent)"
    );
    // The viewer knows the tracks: from `joined` or from `track_published`.
    let tracks = sink.tracks();
    assert!(
        tracks.iter().any(|t| t.kind == "video" && t.codec == "video/VP8"),
        "{tracks:?}"
    );

    // Mute stops the frames, unmute brings them back.
    source.mute("video", true).await.expect("mute");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let muted = frames_during(&sink, Duration::from_secs(1)).await;
    assert!(muted <= 1, "{muted} frames arrived while muted");
    source.mute("video", false).await.expect("unmute");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unmuted = frames_during(&sink, Duration::from_secs(1)).await;
    assert!(unmuted >= 20, "{unmuted} frames after unmute");
    let stats = sink.play_stats().await;
    println!(
        "{publisher:?} → {viewer:?}: first frame {latency:?}, {} frames, loss {:.4}, largest gap {:?}",
        stats.video.frames,
        stats.video.loss_fraction(),
        stats.video.frame_gap_max
    );
    assert!(stats.video.loss_fraction() < 0.01, "{stats:?}");

    // Unsubscribing from the defaults stops the video; subscribing again brings it back.
    let video = tracks
        .iter()
        .find(|t| t.kind == "video")
        .expect("video track")
        .id
        .clone();
    sink.unsubscribe(vec![video.clone()]).await.expect("unsubscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unsubscribed = frames_during(&sink, Duration::from_secs(1)).await;
    assert!(unsubscribed <= 1, "{unsubscribed} frames after unsubscribing");
    sink.subscribe(vec![video]).await.expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resubscribed = frames_during(&sink, Duration::from_secs(1)).await;
    assert!(resubscribed >= 20, "{resubscribed} frames after subscribing again");
    sink.close().await;
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_one_transport_play_over_the_other() {
    let node = start_node(&[]).await;
    publish_and_play(&node, "sig-ws-grpc", Transport::WebSocket, Transport::Grpc).await;
    publish_and_play(&node, "sig-grpc-ws", Transport::Grpc, Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_viewer_resumes_within_the_window_and_starts_over_after_it() {
    let node = start_node(&["--resume-window-ms", "3000"]).await;
    let room = "sig-resume";
    let source = join(&node, room, Role::Publisher, Transport::WebSocket).await;
    source.publish(publish_options()).await.expect("publishes");
    let sink = join(&node, room, Role::Subscriber, Transport::Grpc).await;
    // Listed in `joined`, or announced by `track_published` once its first packet arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let track = loop {
        if let Some(track) = sink.tracks().into_iter().find(|t| t.kind == "video") {
            break track;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher's video track is never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sink.subscribe(vec![track.id.clone()]).await.expect("subscribe");
    sink.play(PlayOptions::default()).await.expect("plays");
    sink.wait_first_frame(Duration::from_secs(10))
        .await
        .expect("first frame");
    let session = sink.session();
    let mut events = sink.events();

    // Cut within the window: same session and subscriptions, frames again.
    sink.cut(Duration::from_millis(500)).await.expect("cut");
    let reconnected = wait_reconnected(&mut events).await;
    assert_eq!(reconnected, (true, session.clone()), "resumed with the same session");
    assert!(sink.resumed());
    let viewer = viewer_state(&node, &session).await;
    assert_eq!(viewer["subscriptions"], serde_json::json!([track.id]), "{viewer}");
    let before = video_frames(&sink).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while video_frames(&sink).await < before + 30 {
        assert!(tokio::time::Instant::now() < deadline, "no frames after the resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Cut past the window: a new session.
    sink.cut(Duration::from_millis(4_500)).await.expect("cut");
    let (resumed, new_session) = wait_reconnected(&mut events).await;
    assert!(!resumed, "no resume after the window");
    assert_ne!(new_session, session);
    assert_eq!((sink.reconnects(), sink.resumes()), (2, 1));
    sink.close().await;
    source.close().await;
}

/// Waits until the viewer's latest keyframe has `width`; returns how long that took.
async fn wait_keyframe_width(client: &Client, width: u16, within: Duration) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let video = client.play_stats().await.video;
        if video.keyframe_width == width {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "keyframes still {}x{} after {within:?}, waiting for width {width}",
            video.keyframe_width,
            video.keyframe_height
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_switch_takes_effect() {
    let node = start_node(&[]).await;
    let room = "sig-layers";
    let source = join(&node, room, Role::Publisher, Transport::WebSocket).await;
    let simulcast = PublishOptions {
        simulcast: true,
        video_bitrate_bps: 700_000,
        keyframe_interval_frames: 30,
        ..Default::default()
    };
    source.publish(simulcast).await.expect("publishes three layers");
    let sink = join(&node, room, Role::Subscriber, Transport::Grpc).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let layers = loop {
        let video = sink.tracks().into_iter().find(|t| t.kind == "video");
        if let Some(video) = video.filter(|t| !t.layers.is_empty()) {
            break video.layers;
        }
        assert!(tokio::time::Instant::now() < deadline, "no simulcast track listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(layers, ["q", "h", "f"]);
    sink.play(PlayOptions::default()).await.expect("plays");
    sink.wait_first_frame(Duration::from_secs(10))
        .await
        .expect("first frame");
    sink.set_layer("low").await.expect("set_layer low");
    let to_low = wait_keyframe_width(&sink, 160, Duration::from_secs(10)).await;
    sink.set_layer("high").await.expect("set_layer high");
    let to_high = wait_keyframe_width(&sink, 640, Duration::from_secs(10)).await;
    println!("layer switch: to low in {to_low:?}, to high in {to_high:?}");
    let stats = sink.play_stats().await;
    assert!(stats.video.loss_fraction() < 0.01, "{stats:?}");
    sink.close().await;
    source.close().await;
}

/// Publishes `publish` over WebSocket, plays over gRPC; returns the viewer's stats after 1.5 s.
async fn play_what_is_published(node: &TestNode, room: &str, publish: PublishOptions) -> mediamesh_sdk::PlayStats {
    let source = join(node, room, Role::Publisher, Transport::WebSocket).await;
    source.publish(publish).await.expect("publishes");
    let sink = join(node, room, Role::Subscriber, Transport::Grpc).await;
    sink.play(PlayOptions::default()).await.expect("plays");
    sink.wait_first_frame(Duration::from_secs(10))
        .await
        .expect("first frame");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stats = sink.play_stats().await;
    sink.close().await;
    source.close().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_frames_and_ivf_ogg_files_are_published() {
    let node = start_node(&[]).await;
    let h264 = PublishOptions {
        video_codec: mediamesh_sdk::VideoCodec::H264,
        video_bitrate_bps: 300_000,
        keyframe_interval_frames: 30,
        ..Default::default()
    };
    let stats = play_what_is_published(&node, "sig-h264", h264).await;
    assert!(stats.video.frames >= 40 && stats.video.keyframes >= 1, "{stats:?}");
    assert!(stats.video.loss_fraction() < 0.01, "{stats:?}");

    // A 25 fps IVF file (48 frames, a keyframe every 12) and an Ogg Opus file of distinct packets.
    let dir = std::env::temp_dir().join(format!("mediamesh-files-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let packetizer = mediamesh_sdk::media::Vp8Packetizer::new(352, 288, 1_200);
    let frames: Vec<_> = (0..48).map(|i| packetizer.frame_data(i % 12 == 0, 1_500)).collect();
    let ivf = dir.join("clip.ivf");
    std::fs::write(&ivf, mediamesh_sdk::files::write_ivf(352, 288, 25, &frames)).expect("write ivf");
    let packets: Vec<bytes::Bytes> = (0..50u8).map(|i| vec![0xF8, 0xFF, 0xFE, i].into()).collect();
    let ogg = dir.join("clip.ogg");
    std::fs::write(&ogg, mediamesh_sdk::files::write_ogg_opus(&packets)).expect("write ogg");
    let from_files = PublishOptions {
        video_file: Some(ivf),
        audio_file: Some(ogg),
        ..Default::default()
    };
    let stats = play_what_is_published(&node, "sig-files", from_files).await;
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        (stats.video.keyframe_width, stats.video.keyframe_height),
        (352, 288),
        "{stats:?}"
    );
    assert!(stats.video.frames >= 30, "25 fps for 1.5 s and more: {stats:?}");
    assert!(
        stats.audio.packets >= 50 && stats.audio.bytes == stats.audio.packets * 4,
        "{stats:?}"
    );

    // A file that is not IVF: a clear error before anything is negotiated.
    let client = join(&node, "sig-files", Role::Publisher, Transport::WebSocket).await;
    let bad = PublishOptions {
        video_file: Some("Cargo.toml".into()),
        ..Default::default()
    };
    let error = client.publish(bad).await.expect_err("not an IVF file");
    assert!(error.to_string().contains("not an IVF file"), "{error}");
    client.close().await;
}

async fn wait_reconnected(events: &mut tokio::sync::broadcast::Receiver<mediamesh_sdk::Event>) -> (bool, String) {
    let wait = async {
        loop {
            if let Ok(mediamesh_sdk::Event::Reconnected { resumed, session }) = events.recv().await {
                return (resumed, session);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("reconnected within 20 s")
}

async fn viewer_state(node: &TestNode, viewer: &str) -> serde_json::Value {
    let url = format!("{}/admin/v1/viewers/{viewer}", node.base);
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(node.admin_token())
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(response.status(), 200);
    response.json().await.expect("viewer state JSON")
}

/// A scripted signal server that joins the client, then tells it to move to `to`.
async fn moving_server(to: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("the client connects");
        let mut ws = tokio_tungstenite::accept_async(stream).await.expect("handshake");
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else { continue };
            if text.contains("\"join\"") {
                let joined = r#"{"id":1,"joined":{"session":"scripted","resume_token":"","node":"scripted"}}"#;
                ws.send(Message::text(joined)).await.expect("joined");
                let moved = serde_json::json!({"moved": {"url": to, "resume_token": ""}}).to_string();
                ws.send(Message::text(moved)).await.expect("moved");
            }
        }
    });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_follows_moved_to_another_node() {
    let node = start_node(&[]).await;
    let room = "sig-moved";
    let scripted = moving_server(node.base.clone()).await;
    let client = Client::connect(
        &scripted,
        &node.subscribe_token(room),
        options(room, Role::Subscriber, Transport::WebSocket),
    )
    .await
    .expect("joins the scripted node");
    let mut events = client.events();
    let (_, session) = wait_reconnected(&mut events).await;
    assert_eq!(client.node(), "test-1", "now on the node it was moved to");
    assert_eq!(client.session(), session);
    assert_ne!(session, "scripted");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_on_both_transports() {
    let node = start_node(&["--signal-idle-timeout-ms", "800"]).await;
    for transport in [Transport::WebSocket, Transport::Grpc] {
        let silent = ClientOptions {
            ping_interval: Duration::from_secs(3600),
            position_interval: None,
            reconnect: false,
            ..options("sig-idle", Role::Subscriber, transport)
        };
        let client = Client::connect(&node.base, &node.subscribe_token("sig-idle"), silent)
            .await
            .expect("joins");
        let mut events = client.events();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            let mut idle_error = false;
            loop {
                match events.recv().await {
                    Ok(mediamesh_sdk::Event::Error { code, .. }) if code == "idle_timeout" => idle_error = true,
                    Ok(mediamesh_sdk::Event::Disconnected) => return idle_error,
                    Ok(_) => {}
                    Err(_) => return idle_error,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{transport:?}: a silent session was not ended"));
        assert!(ended, "{transport:?}: idle_timeout error before the close");
        // A client that pings stays.
        let pinging = ClientOptions {
            ping_interval: Duration::from_millis(200),
            ..options("sig-idle", Role::Subscriber, transport)
        };
        let client = Client::connect(&node.base, &node.subscribe_token("sig-idle"), pinging)
            .await
            .expect("joins");
        let mut events = client.events();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        // Every event of those 2 s, not just the first: none may be an end or an error.
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        assert!(
            !seen.iter().any(|e| matches!(
                e,
                mediamesh_sdk::Event::Disconnected | mediamesh_sdk::Event::Error { .. }
            )),
            "{transport:?}: a pinging session was ended: {seen:?}"
        );
        assert_eq!(client.reconnects(), 0);
        client.close().await;
    }
}

async fn resumes_counted(node: &TestNode, outcome: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.base))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let series = format!("mediamesh_viewer_resumes_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_with_a_resume_token_takes_the_viewer_state_back() {
    let node = start_node(&[]).await;
    let room = "sig-whep-resume";
    let source = join(&node, room, Role::Publisher, Transport::WebSocket).await;
    source.publish(publish_options()).await.expect("publishes");
    let viewer = join(&node, room, Role::Subscriber, Transport::WebSocket).await;
    // The signal viewer drops the video: its stored state keeps only the audio track.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (video, audio) = loop {
        let tracks = viewer.tracks();
        let id = |kind: &str| tracks.iter().find(|t| t.kind == kind).map(|t| t.id.clone());
        if let (Some(video), Some(audio)) = (id("video"), id("audio")) {
            break (video, audio);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher's tracks are never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    viewer.unsubscribe(vec![video]).await.expect("unsubscribe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while viewer_state(&node, &viewer.session()).await["subscriptions"] != serde_json::json!([audio]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the choice never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = viewer.resume_token();
    let url = |query: &str| format!("{}/whep/{room}?{query}", node.base);
    // A WHEP player that carries that resume token gets the choice back: audio, no video. One
    // without it gets the room's defaults, video included.
    let before = resumes_counted(&node, "resumed").await;
    let play = |query: String| {
        let (url, token) = (url(&query), node.subscribe_token(room));
        async move {
            mediamesh_sdk::play(&url, &token, PlayOptions::default())
                .await
                .expect("WHEP plays")
        }
    };
    let resumed = play(format!("resume={token}")).await;
    let fresh = play(String::new()).await;
    fresh
        .wait_first_frame(Duration::from_secs(10))
        .await
        .expect("the defaults bring video");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = resumed.stats();
    assert!(stats.audio.packets > 0, "the resumed player hears the audio: {stats:?}");
    assert_eq!(stats.video.packets, 0, "the resumed player left the video out");
    assert_eq!(resumes_counted(&node, "resumed").await, before + 1.0);
    resumed.close().await.expect("close");
    fresh.close().await.expect("close");
    // A malformed token, or one for another room, is refused with a problem document.
    let other_room = join(&node, "sig-whep-other", Role::Subscriber, Transport::WebSocket).await;
    for bad in ["not-a-token".to_string(), other_room.resume_token()] {
        let response = reqwest::Client::new()
            .post(url(&format!("resume={bad}")))
            .bearer_auth(node.subscribe_token(room))
            .header("content-type", "application/sdp")
            .body(common::sample_offer())
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 400, "resume token {bad:.20}");
        let problem: serde_json::Value = response.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().unwrap_or_default().starts_with("resume:"),
            "{problem}"
        );
    }
    other_room.close().await;
    viewer.close().await;
    source.close().await;
}

/// A session answered with another session's viewer state has lost the viewer (the
/// simulator's seed 30: two resumes from one state). Here the operator takes the viewer over
/// with another session (`PUT` with a new `session`): the live session's next position write
/// is answered with the operator's state, it ends with `replaced`, and the SDK resumes from the
/// operator's state, one generation up, under a session of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_viewer_is_taken_over_ends_replaced_and_its_client_resumes() {
    let node = start_node(&[]).await;
    let room = "sig-takeover";
    let source = join(&node, room, Role::Publisher, Transport::WebSocket).await;
    let sink = join(&node, room, Role::Subscriber, Transport::WebSocket).await;
    let viewer = sink.session();
    let mut events = sink.events();
    let before = viewer_state(&node, &viewer).await;
    let (first_session, generation) = (
        before["session"].as_str().expect("session").to_string(),
        before["generation"].as_u64().expect("generation"),
    );
    assert_ne!(
        first_session, viewer,
        "a signal session writes under its own id: {before}"
    );
    let url = format!("{}/admin/v1/viewers/{viewer}", node.base);
    let put = |body: serde_json::Value| {
        let (url, token) = (url.clone(), node.admin_token());
        async move {
            reqwest::Client::new()
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("PUT answers")
        }
    };
    // Without a session the operator writes as the live one: nothing is taken over.
    let response = put(serde_json::json!({ "room": room, "position_ms": 1_000 })).await;
    assert_eq!(response.status(), 200);
    let written: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(
        (written["session"].as_str(), written["generation"].as_u64()),
        (Some(first_session.as_str()), Some(generation)),
        "{written}"
    );
    // With another session, the operator takes the viewer over.
    let response = put(serde_json::json!({ "room": room, "position_ms": 777_000, "session": "operator" })).await;
    assert_eq!(response.status(), 200);
    let written: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(written["generation"].as_u64(), Some(generation + 1), "{written}");
    let wait = async {
        let mut replaced = false;
        loop {
            match events.recv().await {
                Ok(mediamesh_sdk::Event::Error { code, .. }) if code == "replaced" => replaced = true,
                Ok(mediamesh_sdk::Event::Reconnected { resumed, session }) => return (replaced, resumed, session),
                _ => {}
            }
        }
    };
    let (replaced, resumed, session) = tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("the taken-over session ends and its client comes back within 20 s");
    assert!(replaced, "the session ended with `replaced`");
    assert!(resumed && session == viewer, "resumed as the same viewer");
    let after = viewer_state(&node, &viewer).await;
    assert_eq!(after["generation"].as_u64(), Some(generation + 2), "{after}");
    let owner = after["session"].as_str().unwrap_or_default();
    assert!(owner != first_session && owner != "operator", "{after}");
    sink.close().await;
    source.close().await;
}
