//! The TURN relays of a two-node cluster (seoul-1, busan-1): the ICE servers in a WHIP answer come
//! from the membership, the client's region first; a credential minted on one node allocates on
//! the other's relay; the peer policy includes the other node's media ports and nothing else.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/turn_client.rs"]
mod turn_client;

use cluster::ProcessCluster;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use turn_client::{Client, ice_server_links};

const NODES: [(&str, &str); 2] = [("seoul-1", "seoul"), ("busan-1", "busan")];

fn whip(cluster: &ProcessCluster, node: usize, region: Option<&str>) -> reqwest::blocking::Response {
    let token = mediamesh::auth::TokenKeys::new(&cluster.secret).create(
        "viewer-7",
        "*",
        mediamesh::auth::Grants {
            publish: true,
            ..Default::default()
        },
        Duration::from_secs(600),
    );
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{}/whip/turn-{node}", cluster.nodes[node].base_url()))
        .bearer_auth(token)
        .header("content-type", "application/sdp")
        .body(common::sample_offer());
    if let Some(region) = region {
        request = request.header("x-region-preference", region);
    }
    let response = request.send().unwrap();
    assert_eq!(response.status(), 201);
    response
}

#[test]
fn relays_come_from_the_membership_and_the_policy_spans_the_mesh() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_mediamesh"));
    let mut cluster = ProcessCluster::start(binary, &NODES, &[], Duration::from_secs(60));
    cluster.wait_all_voters(Instant::now() + Duration::from_secs(30));
    let turn_url = |i: usize| format!("turn:127.0.0.1:{}?transport=udp", cluster.nodes[i].spec.turn_port);

    // Both relays once both registrations are in the store (and the secret on both nodes).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut servers = Vec::new();
    while Instant::now() < deadline {
        servers = ice_server_links(whip(&cluster, 0, None).headers());
        if servers.len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        servers.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        [turn_url(0), turn_url(1)],
        "this node's region first"
    );
    let busan_first = ice_server_links(whip(&cluster, 0, Some("busan")).headers());
    assert_eq!(
        busan_first.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        [turn_url(1), turn_url(0)],
        "the client's region first"
    );

    // A credential minted by seoul-1 allocates on busan-1's relay.
    let (_, username, credential) = &busan_first[0];
    assert!(username.ends_with(":viewer-7"));
    let busan_relay: SocketAddr = format!("127.0.0.1:{}", cluster.nodes[1].spec.turn_port)
        .parse()
        .unwrap();
    let mut client = Client::new(busan_relay, username, credential);
    client.allocate().expect("allocation on the other node's relay");
    // Its policy: seoul-1's media ports are the mesh; seoul-1's HTTP port is not.
    let seoul_media: SocketAddr = format!("127.0.0.1:{}", cluster.nodes[0].spec.media_ports.0)
        .parse()
        .unwrap();
    let seoul_http: SocketAddr = format!("127.0.0.1:{}", cluster.nodes[0].spec.http_port)
        .parse()
        .unwrap();
    assert_eq!(
        client.channel_bind(0x4000, seoul_media),
        0,
        "the other node's media port"
    );
    assert_eq!(
        client.channel_bind(0x4001, seoul_http),
        403,
        "the other node's HTTP port"
    );
    assert_eq!(client.create_permission("10.0.0.1:5000".parse().unwrap()), 403);
}
