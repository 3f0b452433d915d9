//! Every kind of bad input over the real HTTP and UDP interfaces gets a clear error, and the node
//! keeps serving afterwards.

mod common;

use common::{TestNode, sample_offer};
use mediamesh::auth::Grants;
use reqwest::blocking::{Client, Response};
use std::net::UdpSocket;
use std::time::Duration;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

/// Asserts status and an RFC 9457 problem body naming the status.
fn assert_problem(response: Response, status: u16, detail_contains: &str) {
    assert_eq!(response.status().as_u16(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = response.json().expect("problem body is JSON");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string(), "{body}");
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(detail_contains),
        "detail {detail:?} lacks {detail_contains:?}"
    );
}

fn post_sdp(node: &TestNode, path: &str, token: Option<&str>, content_type: &str, body: String) -> Response {
    let mut request = client()
        .post(format!("{}{path}", node.base))
        .header("content-type", content_type)
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().expect("request reaches the node")
}

/// The node still takes a fresh WHIP session: the proof that nothing was lost.
fn assert_still_serving(node: &mut TestNode) {
    assert!(node.is_running(), "node process exited");
    let token = node.publish_token("alive");
    let response = post_sdp(node, "/whip/alive", Some(&token), "application/sdp", sample_offer());
    assert_eq!(response.status().as_u16(), 201, "{:?}", response.text());
}

#[test]
fn malformed_sdp_is_400() {
    let mut node = TestNode::start(&[]);
    let token = node.publish_token("room1");
    for body in [
        "",
        "hello",
        "v=0\r\ns=-\r\n",
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
    ] {
        let response = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", body.to_string());
        assert_problem(response, 400, "SDP");
    }
    // Structurally fine but semantically broken offers reach the WebRTC stack and still get 400.
    let broken = sample_offer()
        .replace("a=rtpmap:96 VP8/90000", "a=rtpmap:96 XYZ/90000")
        .replace("opus/48000/2", "nope/1");
    let response = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", broken);
    assert_problem(response, 400, "codec");
    let not_utf8 = unsafe { String::from_utf8_unchecked(vec![0xff, 0xfe, 0x00]) };
    let response = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", not_utf8);
    assert_eq!(response.status().as_u16(), 400);
    assert_still_serving(&mut node);
}

#[test]
fn wrong_content_type_is_415() {
    let mut node = TestNode::start(&[]);
    let token = node.subscribe_token("room1");
    for content_type in ["application/json", "text/plain", "application/sdpx"] {
        let response = post_sdp(&node, "/whep/room1", Some(&token), content_type, sample_offer());
        assert_problem(response, 415, "application/sdp");
    }
    assert_still_serving(&mut node);
}

#[test]
fn oversized_body_is_413() {
    let mut node = TestNode::start(&["--body-bytes-max", "4096"]);
    let token = node.publish_token("room1");
    let huge = sample_offer() + &"a=x-padding:0123456789\r\n".repeat(1_000);
    let response = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", huge);
    assert_problem(response, 413, "4096");
    assert_still_serving(&mut node);
}

#[test]
fn missing_invalid_and_expired_tokens_are_401() {
    let mut node = TestNode::start(&[]);
    let response = post_sdp(&node, "/whip/room1", None, "application/sdp", sample_offer());
    assert_problem(response, 401, "missing");
    let response = post_sdp(
        &node,
        "/whip/room1",
        Some("not-a-jwt"),
        "application/sdp",
        sample_offer(),
    );
    assert_problem(response, 401, "invalid");
    let forged = mediamesh::auth::TokenKeys::new("another-secret-0123456789").create(
        "mallory",
        "*",
        Grants {
            publish: true,
            ..Default::default()
        },
        Duration::from_secs(60),
    );
    let response = post_sdp(&node, "/whip/room1", Some(&forged), "application/sdp", sample_offer());
    assert_problem(response, 401, "invalid");
    let expired = expired_token();
    let response = post_sdp(&node, "/whip/room1", Some(&expired), "application/sdp", sample_offer());
    assert_problem(response, 401, "expired");
    let response = client()
        .get(format!("{}/admin/v1/rooms", node.base))
        .header("authorization", "Basic abc")
        .send()
        .expect("request");
    assert_problem(response, 401, "Authorization");
    assert_still_serving(&mut node);
}

fn expired_token() -> String {
    // An `exp` an hour in the past, signed with the node's secret.
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let claims = mediamesh::auth::Claims {
        region: None,
        sub: "late".into(),
        room: "*".into(),
        grants: Grants {
            publish: true,
            ..Default::default()
        },
        exp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            - 3_600,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .expect("encode")
}

#[test]
fn missing_grant_or_other_room_is_403() {
    let mut node = TestNode::start(&[]);
    let subscriber = node.subscribe_token("room1");
    let response = post_sdp(
        &node,
        "/whip/room1",
        Some(&subscriber),
        "application/sdp",
        sample_offer(),
    );
    assert_problem(response, 403, "Publish");
    let publisher_elsewhere = node.publish_token("room2");
    let response = post_sdp(
        &node,
        "/whip/room1",
        Some(&publisher_elsewhere),
        "application/sdp",
        sample_offer(),
    );
    assert_problem(response, 403, "room");
    let response = client()
        .get(format!("{}/admin/v1/rooms", node.base))
        .bearer_auth(&subscriber)
        .send()
        .expect("request");
    assert_problem(response, 403, "Admin");
    assert_still_serving(&mut node);
}

#[test]
fn unknown_sessions_and_rooms_are_404() {
    let mut node = TestNode::start(&[]);
    let token = node.publish_token("*");
    let delete = client()
        .delete(format!("{}/whip/nosuchroom/0123", node.base))
        .bearer_auth(&token)
        .send()
        .expect("request");
    assert_problem(delete, 404, "session");
    // A session id that does not exist in a room that does.
    let created = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", sample_offer());
    assert_eq!(created.status().as_u16(), 201);
    let location = created.headers()["location"].to_str().expect("ascii").to_string();
    assert!(location.starts_with("/whip/room1/"), "{location}");
    assert!(created.headers().contains_key("etag"));
    let patch = client()
        .patch(format!("{}/whip/room1/not-a-session", node.base))
        .bearer_auth(&token)
        .header("content-type", "application/trickle-ice-sdpfrag")
        .body("a=end-of-candidates\r\n")
        .send()
        .expect("request");
    assert_problem(patch, 404, "session");
    let admin = node.admin_token();
    let room = client()
        .get(format!("{}/admin/v1/rooms/nosuchroom", node.base))
        .bearer_auth(&admin)
        .send()
        .expect("request");
    assert_problem(room, 404, "nosuchroom");
    // The real session: a bad fragment is 400, a stale ETag 412, then DELETE twice is 200 then 404.
    let session_url = format!("{}{location}", node.base);
    let bad_fragment = client()
        .patch(&session_url)
        .bearer_auth(&token)
        .header("content-type", "application/trickle-ice-sdpfrag")
        .body("this is not sdp\r\n")
        .send()
        .expect("request");
    assert_problem(bad_fragment, 400, "fragment");
    let stale = client()
        .patch(&session_url)
        .bearer_auth(&token)
        .header("content-type", "application/trickle-ice-sdpfrag")
        .header("if-match", "\"stale\"")
        .body("a=end-of-candidates\r\n")
        .send()
        .expect("request");
    assert_problem(stale, 412, "ETag");
    let first = client()
        .delete(&session_url)
        .bearer_auth(&token)
        .send()
        .expect("request");
    assert_eq!(first.status().as_u16(), 200);
    let second = client()
        .delete(&session_url)
        .bearer_auth(&token)
        .send()
        .expect("request");
    assert_problem(second, 404, "session");
    assert_still_serving(&mut node);
}

#[test]
fn bad_room_names_and_layers_are_400() {
    let mut node = TestNode::start(&[]);
    let token = node.token(
        "*",
        Grants {
            publish: true,
            subscribe: true,
            admin: false,
        },
    );
    let long = "x".repeat(200);
    for path in [format!("/whip/{long}"), "/whip/bad%20room".to_string()] {
        let response = post_sdp(&node, &path, Some(&token), "application/sdp", sample_offer());
        assert_problem(response, 400, "room name");
    }
    let response = post_sdp(
        &node,
        "/whep/room1?layer=ultra",
        Some(&token),
        "application/sdp",
        sample_offer(),
    );
    assert_problem(response, 400, "layer");
    assert_still_serving(&mut node);
}

#[test]
fn limits_answer_429_and_503() {
    let mut node = TestNode::start(&[
        "--subscribers-per-room-max",
        "1",
        "--rooms-per-node-max",
        "2",
        "--sessions-per-node-max",
        "3",
    ]);
    let token = node.token(
        "*",
        Grants {
            publish: true,
            subscribe: true,
            admin: false,
        },
    );
    let post = |path: &str| post_sdp(&node, path, Some(&token), "application/sdp", sample_offer());
    assert_eq!(post("/whep/a").status().as_u16(), 201);
    assert_problem(post("/whep/a"), 429, "subscribers");
    assert_eq!(post("/whip/b").status().as_u16(), 201);
    assert_problem(post("/whip/c"), 503, "rooms");
    assert_eq!(post("/whip/b").status().as_u16(), 201);
    assert_problem(post("/whip/b"), 503, "sessions");
    assert!(node.is_running());
    let health = reqwest::blocking::get(format!("{}/healthz", node.base)).expect("health");
    assert_eq!(health.status().as_u16(), 200);
}

#[test]
fn garbage_datagrams_on_media_ports_are_dropped() {
    let mut node = TestNode::start(&[]);
    let token = node.publish_token("room1");
    // One live session, so at least one port of the range has a socket reading it.
    let created = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", sample_offer());
    assert_eq!(created.status().as_u16(), 201);
    let answer = created.text().expect("answer");
    let port: u16 = answer
        .lines()
        .find_map(|l| l.strip_prefix("a=candidate:"))
        .and_then(|c| c.split_whitespace().nth(5))
        .and_then(|p| p.parse().ok())
        .expect("the answer has a host candidate with a port");
    assert!(
        (node.media_ports.0..=node.media_ports.1).contains(&port),
        "{port} outside the media range"
    );
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut seed: u32 = 0x1234_5678;
    for i in 0..5_000u32 {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let len = (seed % 1_400) as usize;
        let mut datagram: Vec<u8> = (0..len).map(|j| (seed >> (j % 24)) as u8).collect();
        // Some that look like STUN, DTLS and RTP by their first byte (RFC 7983 demultiplexing).
        if let Some(first) = datagram.first_mut() {
            *first = [0x00, 0x16, 0x80, 0x90, 0xff][(i % 5) as usize];
        }
        let target = if i % 2 == 0 {
            port
        } else {
            node.media_ports.0 + (i % 40) as u16
        };
        let _ = socket.send_to(&datagram, ("127.0.0.1", target));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_still_serving(&mut node);
    let admin = node.admin_token();
    let room: serde_json::Value = client()
        .get(format!("{}/admin/v1/rooms/room1", node.base))
        .bearer_auth(&admin)
        .send()
        .expect("request")
        .json()
        .expect("json");
    assert_eq!(
        room["publishers"].as_array().map(Vec::len),
        Some(1),
        "the session survived: {room}"
    );
}

#[test]
fn cors_preflight_allows_other_origins() {
    let node = TestNode::start(&[]);
    for path in ["/whip/room1", "/whep/room1", "/whip/room1/abc"] {
        let response = client()
            .request(reqwest::Method::OPTIONS, format!("{}{path}", node.base))
            .header("origin", "https://player.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
            .expect("request");
        assert_eq!(response.status().as_u16(), 204, "{path}");
        let headers = response.headers();
        assert_eq!(headers["access-control-allow-origin"], "*");
        let methods = headers["access-control-allow-methods"].to_str().expect("ascii");
        assert!(methods.contains("POST") && methods.contains("DELETE") && methods.contains("PATCH"));
        let allowed = headers["access-control-allow-headers"]
            .to_str()
            .expect("ascii")
            .to_ascii_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    }
    // Responses expose Location and ETag to scripts.
    let token = node.publish_token("room1");
    let created = post_sdp(&node, "/whip/room1", Some(&token), "application/sdp", sample_offer());
    let exposed = created.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii");
    assert!(exposed.contains("Location") && exposed.contains("ETag"));
}
