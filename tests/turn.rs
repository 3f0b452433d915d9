//! The embedded TURN relay against a real node process, with a small STUN/TURN client built on
//! the `stun`/`turn` crates' message types. Never sends data toward 10.x or 192.168.x: only the
//! permission and channel requests that must be refused.

mod common;
#[path = "common/turn_client.rs"]
mod turn_client;

use common::{TestNode, free_udp_range};
use mediamesh_actors::turn::credentials;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use stun::agent::TransactionId;
use stun::message::{BINDING_REQUEST, Message};
use turn_client::{Answer, Client, ice_server_links, unix_ms, unix_s};

struct Relay {
    node: TestNode,
    addr: SocketAddr,
    secret: String,
}

/// A node whose TURN secret the test sets (through the admin rotation endpoint).
fn relay(extra: &[&str]) -> Relay {
    let node = TestNode::start(extra);
    let addr: SocketAddr = format!("127.0.0.1:{}", node.turn_port).parse().unwrap();
    let secret = format!("turn-test-secret-{}", uuid::Uuid::now_v7().simple());
    rotate(&node, &secret);
    Relay { node, addr, secret }
}

fn rotate(node: &TestNode, secret: &str) -> u64 {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/admin/v1/turn/rotate", node.base))
        .bearer_auth(node.admin_token())
        .json(&serde_json::json!({ "secret": secret }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().unwrap();
    body["rotated_at_ms"].as_u64().unwrap()
}

/// `POST /whip/{room}` with the sample offer; the node must answer 201.
fn whip(node: &TestNode, room: &str) -> reqwest::blocking::Response {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/whip/{room}", node.base))
        .bearer_auth(node.publish_token(room))
        .header("content-type", "application/sdp")
        .body(common::sample_offer())
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    response
}

fn metric(node: &TestNode, line_prefix: &str) -> u64 {
    let text = reqwest::blocking::get(format!("{}/metrics", node.base))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no metric {line_prefix}"))
}

#[test]
fn permissions_and_channels_outside_the_mesh_get_403() {
    let relay = relay(&[]);
    let mut client = Client::minted(relay.addr, &relay.secret, "alice");
    client.allocate().expect("allocation");
    for peer in ["10.0.0.1:5000", "192.168.1.1:5000"] {
        let peer: SocketAddr = peer.parse().unwrap();
        assert_eq!(client.create_permission(peer), 403, "CreatePermission toward {peer}");
        assert_eq!(client.channel_bind(0x4000, peer), 403, "ChannelBind toward {peer}");
    }
    // The node's own media addresses are the mesh: allowed.
    let media: SocketAddr = format!("127.0.0.1:{}", relay.node.media_ports.1).parse().unwrap();
    assert_eq!(client.create_permission(media), 0);
    assert_eq!(client.channel_bind(0x4001, media), 0);
    // A channel toward a loopback port outside the media range is refused, though the IP is allowed.
    let http: SocketAddr = relay.node.base.trim_start_matches("http://").parse().unwrap();
    assert_eq!(client.channel_bind(0x4002, http), 403);
    assert!(metric(&relay.node, "mediamesh_turn_refused_peers_total") >= 5);
}

#[test]
fn data_outside_the_media_range_is_never_delivered() {
    let relay = relay(&[]);
    let mut client = Client::minted(relay.addr, &relay.secret, "bob");
    let relayed = client.allocate().expect("allocation");
    // A peer inside the node's media range (nothing else binds it: no sessions in this test),
    // and one on loopback outside it.
    let inside = UdpSocket::bind(("127.0.0.1", relay.node.media_ports.1)).unwrap();
    let outside_port = free_udp_range(1).0;
    let outside = UdpSocket::bind(("127.0.0.1", outside_port)).unwrap();
    for s in [&inside, &outside] {
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    }
    let (inside_addr, outside_addr) = (inside.local_addr().unwrap(), outside.local_addr().unwrap());
    let http: SocketAddr = relay.node.base.trim_start_matches("http://").parse().unwrap();
    assert_eq!(client.create_permission(inside_addr), 0);

    client.send_indication(outside_addr, b"must not arrive (send)");
    client.send_indication(http, b"must not arrive (http port)");
    client.send_indication(inside_addr, b"control");
    let mut buf = [0u8; 1500];
    let (n, from) = inside.recv_from(&mut buf).expect("the control datagram arrives");
    assert_eq!((&buf[..n], from), (&b"control"[..], relayed));
    // The permitted peer is heard back (a Data indication: no channel yet).
    inside.send_to(b"data back", relayed).unwrap();
    assert_eq!(client.recv_data(), Some((inside_addr, b"data back".to_vec())));

    assert_eq!(client.channel_bind(0x4000, outside_addr), 403);
    client.channel_data(0x4000, b"must not arrive (channel)");
    assert_eq!(client.channel_bind(0x4001, inside_addr), 0);
    client.channel_data(0x4001, b"control 2");
    let (n, _) = inside.recv_from(&mut buf).expect("the channel datagram arrives");
    assert_eq!(&buf[..n], b"control 2");
    assert!(
        outside.recv_from(&mut buf).is_err(),
        "a datagram reached a port outside the media range"
    );

    // Inbound: the outside port is not heard either, the inside one is (as ChannelData, bound).
    outside.send_to(b"from outside", relayed).unwrap();
    let _ = client.socket.set_read_timeout(Some(Duration::from_millis(700)));
    let mut got = Vec::new();
    while let Ok((n, _)) = client.socket.recv_from(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    assert!(got.iter().all(|d| !d.windows(12).any(|w| w == b"from outside")));
    inside.send_to(b"from inside", relayed).unwrap();
    let (n, _) = client.socket.recv_from(&mut buf).expect("the inside peer is relayed");
    assert_eq!(&buf[..4], &[0x40, 0x01, 0, 11]);
    assert_eq!(&buf[4..n.min(15)], b"from inside");
    assert!(metric(&relay.node, "mediamesh_turn_refused_peers_total") >= 3);
    assert!(
        metric(
            &relay.node,
            "mediamesh_turn_relayed_packets_total{direction=\"to_peer\"}"
        ) >= 2
    );
}

#[test]
fn wrong_password_gets_401_and_is_counted() {
    let relay = relay(&[]);
    let good = credentials::mint(&relay.secret, "carol", unix_s() + 600);
    let mut client = Client::new(relay.addr, &good.username, "d3Jvbmc=");
    assert_eq!(client.allocate(), Err(401));
    let other = credentials::mint("another-secret-entirely", "carol", unix_s() + 600);
    let mut client = Client::new(relay.addr, &other.username, &other.password);
    assert_eq!(client.allocate(), Err(401));
    let expired = credentials::mint(&relay.secret, "carol", unix_s() - 1);
    let mut client = Client::new(relay.addr, &expired.username, &expired.password);
    assert_eq!(client.allocate(), Err(401));
    assert!(metric(&relay.node, "mediamesh_turn_auth_failures_total") >= 3);
    let mut client = Client::minted(relay.addr, &relay.secret, "carol");
    assert!(client.allocate().is_ok());
    assert_eq!(metric(&relay.node, "mediamesh_turn_allocations "), 1);
    assert_eq!(metric(&relay.node, "mediamesh_turn_allocations_total"), 1);
}

#[test]
fn rotated_secret_keeps_the_old_one_for_the_grace_period() {
    let grace_ms = 3000;
    let relay = relay(&["--turn-secret-grace-ms", "3000"]);
    let old = relay.secret.clone();
    let new = format!("turn-test-rotated-{}", uuid::Uuid::now_v7().simple());
    let rotated_at_ms = rotate(&relay.node, &new);
    assert!(
        Client::minted(relay.addr, &new, "dave").allocate().is_ok(),
        "new secret"
    );
    assert!(
        Client::minted(relay.addr, &old, "dave").allocate().is_ok(),
        "old secret in the grace period"
    );
    let until = rotated_at_ms + grace_ms + 300;
    std::thread::sleep(Duration::from_millis(until.saturating_sub(unix_ms())));
    assert_eq!(
        Client::minted(relay.addr, &old, "dave").allocate(),
        Err(401),
        "old secret after the grace"
    );
    assert!(
        Client::minted(relay.addr, &new, "dave").allocate().is_ok(),
        "new secret still"
    );
}

#[test]
fn bad_input_is_refused_and_the_relay_stays_up() {
    let relay = relay(&[]);
    let probe = Client::minted(relay.addr, &relay.secret, "eve");
    let valid = probe.allocate_request(false);
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        valid.raw[..10].to_vec(),                  // truncated header
        valid.raw[..valid.raw.len() - 3].to_vec(), // truncated attribute
        vec![0x40, 0x00, 0xff, 0xff, 1, 2],        // ChannelData longer than the datagram
        vec![
            0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ], // length past end
        vec![0u8; 1400],
    ];
    for g in &garbage {
        probe.socket.send_to(g, relay.addr).unwrap();
    }
    // Nothing answers garbage.
    probe.socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 2048];
    assert!(probe.socket.recv_from(&mut buf).is_err(), "garbage was answered");

    // Wrong realm: 401 with a new challenge.
    let mut wrong_realm = Client::minted(relay.addr, &relay.secret, "eve");
    wrong_realm.realm = "not-mediamesh".into();
    wrong_realm.nonce = "x".into();
    let m = wrong_realm.allocate_request(true);
    assert_eq!(
        wrong_realm.exchange(&m),
        Some(Answer::Error(438)),
        "an unknown nonce is stale first"
    );
    let m = wrong_realm.allocate_request(false);
    let Some(Answer::Error(401)) = wrong_realm.exchange_raw(&m) else {
        panic!("challenge")
    };
    let m = wrong_realm.allocate_request(true);
    assert_eq!(wrong_realm.exchange(&m), Some(Answer::Error(401)), "wrong realm");

    // Stale nonce: one the server never issued.
    let mut stale = Client::minted(relay.addr, &relay.secret, "eve");
    stale.nonce = "0123456789abcdef0123456789abcdef".into();
    let m = stale.allocate_request(true);
    assert_eq!(stale.exchange(&m), Some(Answer::Error(438)));

    // Still alive: Binding answers, a proper client allocates.
    let mut binding = Message::new();
    binding
        .build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
        .unwrap();
    assert!(matches!(probe.exchange(&binding), Some(Answer::Success(_))));
    assert!(Client::minted(relay.addr, &relay.secret, "eve").allocate().is_ok());
    assert!(
        metric(
            &relay.node,
            "mediamesh_turn_dropped_packets_total{reason=\"malformed\"}"
        ) >= 5
    );
}

#[test]
fn whip_answer_links_the_relay_with_working_credentials() {
    let relay = relay(&[]);
    let response = whip(&relay.node, "linked");
    let links: Vec<String> = response
        .headers()
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    let link = &links[0];
    let expected_url = format!(
        "<turn:127.0.0.1:{}?transport=udp>; rel=\"ice-server\"",
        relay.node.turn_port
    );
    assert!(link.starts_with(&expected_url), "{link}");
    assert!(link.contains("credential-type=\"password\""));
    let (_, username, credential) = ice_server_links(response.headers()).remove(0);
    assert!(username.ends_with(":tester"), "{username}");
    assert!(Client::new(relay.addr, &username, &credential).allocate().is_ok());
}

#[test]
fn turn_off_binds_nothing_and_links_nothing() {
    let node = TestNode::start(&["--turn", "off"]);
    let response = whip(&node, "off");
    assert!(response.headers().get("link").is_none());
    // No relay started: none of its metrics is registered. (Whether `node.turn_port` is free
    // says nothing: `--turn off` replaced it, and any process may hold it.)
    let exposition = reqwest::blocking::get(format!("{}/metrics", node.base))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        !exposition.contains("mediamesh_turn_"),
        "no relay started, so none of its metrics is registered"
    );
}

#[tokio::test]
async fn signal_joined_carries_the_ice_servers() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;
    let relay = tokio::task::spawn_blocking(|| relay(&[])).await.unwrap();
    let token = relay.node.subscribe_token("signal-turn");
    let url = format!(
        "{}/signal?access_token={token}",
        relay.node.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket opens");
    ws.send(Frame::text(
        r#"{"id":1,"join":{"room":"signal-turn","role":"subscriber"}}"#,
    ))
    .await
    .unwrap();
    let joined = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer")
            .expect("open")
            .expect("a frame");
        if let Frame::Text(text) = frame {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            if value.get("joined").is_some() {
                break value;
            }
        }
    };
    let server = &joined["joined"]["ice_servers"][0];
    assert_eq!(
        server["urls"][0],
        format!("turn:127.0.0.1:{}?transport=udp", relay.node.turn_port),
        "{joined}"
    );
    let (username, credential) = (
        server["username"].as_str().unwrap().to_string(),
        server["credential"].as_str().unwrap().to_string(),
    );
    assert!(username.ends_with(":tester"), "{username}");
    let addr = relay.addr;
    let allocated = tokio::task::spawn_blocking(move || Client::new(addr, &username, &credential).allocate())
        .await
        .unwrap();
    assert!(allocated.is_ok());
    let _ = ws.close(None).await;
    tokio::task::spawn_blocking(move || drop(relay)).await.unwrap();
}

#[test]
fn relays_outside_the_offer_ranges_are_not_offered() {
    let whip_links = |node: &TestNode| whip(node, "offered").headers().get_all("link").iter().count();
    let abroad = TestNode::start(&["--turn-offer-ranges", "10.0.0.0/8,192.168.0.0/16"]);
    assert_eq!(whip_links(&abroad), 0, "127.0.0.1 is outside the offer ranges");
    let home = TestNode::start(&["--turn-offer-ranges", "10.0.0.0/8,127.0.0.0/8"]);
    assert_eq!(whip_links(&home), 1);
}

#[test]
fn a_taken_turn_port_is_a_clear_startup_error() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data_dir = std::env::temp_dir().join(format!("mediamesh-turn-taken-{}", uuid::Uuid::now_v7()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mediamesh"))
        .args(["node", "--data-dir", &data_dir.display().to_string()])
        .args([
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--cluster",
            "127.0.0.1:0",
        ])
        .args(["--advertise", "127.0.0.1", "--turn", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on UDP 127.0.0.1:{port} (--turn)")),
        "{stderr}"
    );
}
