//! The TURN relay's packet entry point (`RelayServer::handle_datagram`) driven directly:
//! - property tests: random and mutated STUN/ChannelData datagrams never panic it, and afterwards
//!   valid requests still get proper answers;
//! - the limits: per-identity and total quotas (486), draining (508), the bandwidth cap.

use mediamesh_actors::turn::credentials::{self, TurnSecrets};
use mediamesh_actors::turn::policy::{PeerPolicy, PortRange};
use mediamesh_actors::turn::server::RelayServer;
use mediamesh_actors::turn::{RelayConfig, RelayState, TurnStats};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    BINDING_REQUEST, CLASS_ERROR_RESPONSE, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_BINDING, Message, MessageType, Setter,
};
use stun::textattrs::TextAttribute;
use turn::proto::reqtrans::RequestedTransport;

const SECRET: &str = "fuzz-secret-0123456789";

/// The runtime relay sockets need (each test enters it).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn server() -> RelayServer {
    server_with(PeerPolicy::new(vec!["127.0.0.1:50000-50010".parse().unwrap()]), 0).0
}

fn server_with(policy: PeerPolicy, bytes_per_second: u64) -> (RelayServer, Arc<RelayState>, Arc<TurnStats>) {
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = Arc::new(tokio::net::UdpSocket::from_std(listener).unwrap());
    let secrets = TurnSecrets {
        current: SECRET.into(),
        previous: None,
        rotated_at_ms: 0,
    };
    let state = Arc::new(RelayState::new(secrets, policy));
    let stats = Arc::new(TurnStats::default());
    let server = RelayServer::new(
        RelayConfig {
            realm: "mediamesh".into(),
            relay_bind_ip: "127.0.0.1".parse().unwrap(),
            relay_public_ip: "127.0.0.1".parse().unwrap(),
            relay_ports: PortRange {
                min: 30_000,
                max: 39_999,
            },
            allocations_per_identity_max: 4,
            allocations_max: 16,
            allocation_bytes_per_second_max: bytes_per_second,
            secret_grace_ms: 0,
        },
        listener,
        Arc::clone(&state),
        Arc::clone(&stats),
    );
    (server, state, stats)
}

fn message(typ: MessageType, attrs: Vec<Box<dyn Setter>>) -> Message {
    let mut setters: Vec<Box<dyn Setter>> = vec![Box::new(TransactionId::new()), Box::new(typ)];
    setters.extend(attrs);
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m
}

fn decode(raw: &[u8]) -> Message {
    let mut m = Message::new();
    m.raw = raw.to_vec();
    m.decode().expect("the relay answers well-formed STUN");
    m
}

/// Valid datagrams of every kind the relay handles (authenticated with a live nonce), to mutate.
fn seeds(server: &RelayServer, src: SocketAddr) -> Vec<Vec<u8>> {
    seeds_for(server, src, "fuzzer", 50_001)
}

/// [`seeds`] for `identity`, toward the peer 127.0.0.1:`peer_port`.
fn seeds_for(server: &RelayServer, src: SocketAddr, identity: &str, peer_port: u16) -> Vec<Vec<u8>> {
    let now = Instant::now();
    let transport = || -> Box<dyn Setter> {
        Box::new(RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        })
    };
    let challenge = message(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST), vec![transport()]);
    let answer = decode(&server.handle_datagram(&challenge.raw, src, now).unwrap());
    let nonce = TextAttribute::get_from_as(&answer, ATTR_NONCE).unwrap().text;
    let expiry = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let c = credentials::mint(SECRET, identity, expiry);
    let auth = |mut attrs: Vec<Box<dyn Setter>>| -> Vec<Box<dyn Setter>> {
        attrs.push(Box::new(TextAttribute::new(ATTR_USERNAME, c.username.clone())));
        attrs.push(Box::new(TextAttribute::new(ATTR_REALM, "mediamesh".into())));
        attrs.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
        attrs.push(Box::new(MessageIntegrity::new_long_term_integrity(
            c.username.clone(),
            "mediamesh".into(),
            c.password.clone(),
        )));
        attrs
    };
    let peer_attr = || -> Box<dyn Setter> {
        Box::new(turn::proto::peeraddr::PeerAddress {
            ip: "127.0.0.1".parse().unwrap(),
            port: peer_port,
        })
    };
    use stun::message::{CLASS_INDICATION, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND};
    vec![
        message(
            MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST),
            auth(vec![transport()]),
        )
        .raw,
        message(
            MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST),
            auth(vec![peer_attr()]),
        )
        .raw,
        message(
            MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
            auth(vec![Box::new(turn::proto::channum::ChannelNumber(0x4000)), peer_attr()]),
        )
        .raw,
        message(MessageType::new(METHOD_REFRESH, CLASS_REQUEST), auth(vec![])).raw,
        message(
            MessageType::new(METHOD_SEND, CLASS_INDICATION),
            vec![peer_attr(), Box::new(turn::proto::data::Data(b"hello".to_vec()))],
        )
        .raw,
        vec![0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0],
        challenge.raw,
    ]
}

fn assert_alive(server: &RelayServer, src: SocketAddr) {
    let binding = message(BINDING_REQUEST, vec![]);
    let answer = decode(
        &server
            .handle_datagram(&binding.raw, src, Instant::now())
            .expect("Binding is answered"),
    );
    assert_eq!(answer.transaction_id, binding.transaction_id);
    assert_eq!(answer.typ, MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE));
    let allocate = message(
        MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST),
        vec![Box::new(RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        })],
    );
    assert_eq!(
        code_of(server.handle_datagram(&allocate.raw, src, Instant::now())),
        401,
        "Allocate without credentials is challenged"
    );
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate(usize),
    Insert { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if data.is_empty() {
            break;
        }
        match m {
            Mutation::Flip { at, xor } => {
                let i = at % data.len();
                data[i] ^= xor;
            }
            Mutation::Truncate(n) => data.truncate(n % data.len()),
            Mutation::Insert { at, bytes } => {
                let i = at % data.len();
                data.splice(i..i, bytes.iter().copied());
            }
        }
    }
    data
}

#[test]
fn random_datagrams_never_break_the_relay() {
    let runtime = runtime();
    let _guard = runtime.enter();
    let server = server();
    let src: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let mut runner = TestRunner::new(Config::with_cases(2000));
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..1500), |bytes| {
            let _ = server.handle_datagram(&bytes, src, Instant::now());
            // STUN-looking prefixes get past the first checks more often.
            let mut stun_like = vec![0x00, 0x03, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
            stun_like.extend_from_slice(&bytes);
            let _ = server.handle_datagram(&stun_like, src, Instant::now());
            Ok(())
        })
        .unwrap();
    assert_alive(&server, src);
}

#[test]
fn mutated_requests_never_break_the_relay() {
    let runtime = runtime();
    let _guard = runtime.enter();
    let server = server();
    let src: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    let valid = seeds(&server, src);
    let mut runner = TestRunner::new(Config::with_cases(3000));
    runner
        .run(
            &(0..valid.len(), proptest::collection::vec(mutation(), 1..4), 0u16..4),
            |(seed, mutations, client)| {
                let datagram = apply(valid[seed].clone(), &mutations);
                let from = SocketAddr::new(src.ip(), 41_000 + client);
                if let Some(response) = server.handle_datagram(&datagram, from, Instant::now()) {
                    // Whatever is answered is well-formed STUN.
                    let _ = decode(&response);
                }
                Ok(())
            },
        )
        .unwrap();
    // The quota held, and an unmutated authenticated Allocate from a new client still succeeds
    // (the quota of its identity permitting: the fuzzed clients may hold up to 4).
    assert!(server.allocation_count() <= 16);
    let fresh = seeds(&server, SocketAddr::new(src.ip(), 42_000));
    let answer = server.handle_datagram(&fresh[0], SocketAddr::new(src.ip(), 42_000), Instant::now());
    let answer = decode(&answer.expect("Allocate is answered"));
    let mut code = ErrorCodeAttribute::default();
    if answer.typ.class == CLASS_ERROR_RESPONSE {
        code.get_from(&answer).unwrap();
        assert_eq!(code.code.0, 486, "only the quota may refuse it");
    } else {
        assert_eq!(answer.typ, MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE));
    }
    assert_alive(&server, src);
}

/// The error code of a response (0 for a success).
fn code_of(response: Option<Vec<u8>>) -> u16 {
    let answer = decode(&response.expect("an answer"));
    if answer.typ.class == CLASS_SUCCESS_RESPONSE {
        return 0;
    }
    let mut code = ErrorCodeAttribute::default();
    code.get_from(&answer).unwrap();
    code.code.0
}

#[test]
fn quotas_and_draining_refuse_allocations() {
    let runtime = runtime();
    let _guard = runtime.enter();
    let (server, state, stats) = server_with(PeerPolicy::default(), 0);
    let allocate = |port: u16, identity: &str| {
        let src = SocketAddr::from(([127, 0, 0, 1], port));
        code_of(server.handle_datagram(&seeds_for(&server, src, identity, 50_001)[0], src, Instant::now()))
    };
    // Per identity: 4.
    for port in 1..=4 {
        assert_eq!(allocate(port, "alice"), 0);
    }
    assert_eq!(allocate(5, "alice"), 486);
    // A second allocation from the same 5-tuple is a mismatch, not a new one.
    assert_eq!(allocate(1, "alice"), 437);
    // Total: 16.
    for port in 6..18 {
        assert_eq!(allocate(port, &format!("user-{port}")), 0);
    }
    assert_eq!(server.allocation_count(), 16);
    assert_eq!(allocate(18, "someone-else"), 486);
    assert_eq!(stats.allocations_refused.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Draining: no new allocation, the existing ones stay.
    state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(allocate(19, "bob"), 508);
    assert_eq!(server.allocation_count(), 16, "the existing allocations stay");
    server.close_all();
    assert_eq!(server.allocation_count(), 0);
    state.draining.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(allocate(19, "bob"), 0);
}

#[test]
fn the_bandwidth_cap_drops_what_exceeds_it() {
    let runtime = runtime();
    let _guard = runtime.enter();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let peer_port = peer.local_addr().unwrap().port();
    let policy = PeerPolicy::new(vec![format!("127.0.0.1:{peer_port}").parse().unwrap()]);
    let (server, _, stats) = server_with(policy, 1_000);
    let src: SocketAddr = "127.0.0.1:45000".parse().unwrap();
    let valid = seeds_for(&server, src, "capped", peer_port);
    assert_eq!(
        code_of(server.handle_datagram(&valid[0], src, Instant::now())),
        0,
        "Allocate"
    );
    assert_eq!(
        code_of(server.handle_datagram(&valid[0], src, Instant::now())),
        0,
        "a retransmitted Allocate gets the same success, not 437"
    );
    assert_eq!(
        code_of(server.handle_datagram(&valid[2], src, Instant::now())),
        0,
        "ChannelBind"
    );
    let mut channel_data = vec![0x40, 0x00, 0x00, 200];
    channel_data.extend_from_slice(&[7u8; 200]);
    for _ in 0..10 {
        assert!(server.handle_datagram(&channel_data, src, Instant::now()).is_none());
    }
    let mut received = 0;
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = peer.recv_from(&mut buf) {
        assert_eq!(n, 200);
        received += 1;
    }
    // A one-second burst of 1000 bytes: five datagrams, the rest dropped and counted.
    assert_eq!(received, 5);
    assert_eq!(
        stats.dropped_over_bandwidth.load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}
