//! The TURN server: one UDP listener, the allocations it holds, and the handling of every datagram
//! a client sends ([`RelayServer::handle_datagram`], the packet entry point).
//!
//! Derived from the `turn` crate 0.17.2 (`src/server/*`, <https://github.com/webrtc-rs/webrtc>),
//! Copyright (c) 2021 WebRTC.rs, licensed MIT OR Apache-2.0; used here under the MIT licence
//! (see the crate's LICENSE-MIT). Changes from upstream:
//! - authentication tries every valid secret's key (current, and previous during the grace
//!   period), answers 401 on a failed integrity check or a wrong realm, counts failures;
//! - CreatePermission and ChannelBind toward a peer outside the [`PeerPolicy`] get 403 Forbidden
//!   IP (RFC 8656 §9.1, §12.1); CreatePermission reads every XOR-PEER-ADDRESS (upstream re-read
//!   the first) and answers 400 when there is none (upstream sent no ERROR-CODE);
//! - Allocate is refused with 486 over the per-identity or total quota and 508 while draining;
//! - the handling is synchronous and returns the response, so it can be driven without a socket
//!   loop (the fuzz test does); datagrams it cannot parse are dropped and counted, never answered.

use super::allocation::{Allocation, BindError, Destination};
use super::credentials::{self, UsernameError};
use super::{RelayConfig, RelayState, TurnStats, unix_ms};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use stun::attributes::{
    ATTR_DONT_FRAGMENT, ATTR_EVEN_PORT, ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_RESERVATION_TOKEN,
    ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    CODE_ADDR_FAMILY_NOT_SUPPORTED, CODE_ALLOC_MISMATCH, CODE_ALLOC_QUOTA_REACHED, CODE_BAD_REQUEST, CODE_FORBIDDEN,
    CODE_INSUFFICIENT_CAPACITY, CODE_PEER_ADDR_FAMILY_MISMATCH, CODE_STALE_NONCE, CODE_UNAUTHORIZED,
    CODE_UNKNOWN_ATTRIBUTE, CODE_UNSUPPORTED_TRANS_PROTO, ErrorCode, ErrorCodeAttribute,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_BINDING, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND, Message, MessageType,
    Method, Setter,
};
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use turn::proto::channum::{ChannelNumber, MAX_CHANNEL_NUMBER, MIN_CHANNEL_NUMBER};
use turn::proto::data::Data;
use turn::proto::lifetime::{DEFAULT_LIFETIME, Lifetime};
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqfamily::{REQUESTED_FAMILY_IPV6, RequestedAddressFamily};
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;

/// Longest allocation lifetime granted (RFC 8656 §7.2 recommends 3600 s).
pub const ALLOCATION_LIFETIME_MAX: Duration = Duration::from_secs(3600);
/// A nonce is accepted this long after it was issued; then the client gets 438 and a new one.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(3600);
/// Outstanding nonces kept at most (a flood of unauthenticated requests cannot grow the map).
pub const NONCES_MAX: usize = 65_536;
/// Ports tried when binding a relay socket.
const RELAY_BIND_ATTEMPTS: usize = 64;

/// A key that verified a request's MESSAGE-INTEGRITY, and the identity of its username.
struct Authenticated {
    key: Vec<u8>,
    identity: String,
}

pub struct RelayServer {
    config: RelayConfig,
    listener: Arc<UdpSocket>,
    state: Arc<RelayState>,
    stats: Arc<TurnStats>,
    /// Client address → allocation (one listener, UDP only: the 5-tuple is the client address).
    allocations: Mutex<HashMap<SocketAddr, Arc<Allocation>>>,
    nonces: Mutex<HashMap<String, Instant>>,
}

impl RelayServer {
    pub fn new(
        config: RelayConfig,
        listener: Arc<UdpSocket>,
        state: Arc<RelayState>,
        stats: Arc<TurnStats>,
    ) -> RelayServer {
        RelayServer {
            config,
            listener,
            state,
            stats,
            allocations: Mutex::new(HashMap::new()),
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the listener until it fails; answers what [`RelayServer::handle_datagram`] returns.
    pub async fn run(self: Arc<Self>) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, src) = match self.listener.recv_from(&mut buf).await {
                Ok(v) => v,
                // ICMP port unreachable from an earlier send surfaces here on Linux: not fatal.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    tracing::error!(error = %e, "TURN listener failed");
                    return;
                }
            };
            if let Some(response) = self.handle_datagram(&buf[..n], src, Instant::now()) {
                let _ = self.listener.send_to(&response, src).await;
            }
        }
    }

    /// Allocations held.
    pub fn allocation_count(&self) -> usize {
        self.allocations.lock().len()
    }

    /// Ends expired allocations, permissions, channels and nonces.
    pub fn sweep(&self, now: Instant) {
        // Each allocation's expiry is read once: one refreshed meanwhile is either kept or closed,
        // never closed and kept.
        let expired: Vec<Arc<Allocation>> = {
            let mut allocations = self.allocations.lock();
            let expired = allocations.extract_if(|_, a| a.expired(now)).map(|(_, a)| a).collect();
            for a in allocations.values() {
                a.sweep(now);
            }
            self.stats
                .allocations
                .store(allocations.len() as u64, Ordering::Relaxed);
            expired
        };
        for a in &expired {
            a.close();
        }
        self.nonces
            .lock()
            .retain(|_, at| now.duration_since(*at) < NONCE_LIFETIME);
    }

    /// Ends every allocation (the relay stops).
    pub fn close_all(&self) {
        let all: Vec<_> = self.allocations.lock().drain().map(|(_, a)| a).collect();
        for a in all {
            a.close();
        }
        self.publish_count();
    }

    fn publish_count(&self) {
        let n = self.allocations.lock().len();
        self.stats.allocations.store(n as u64, Ordering::Relaxed);
    }

    /// Handles one datagram from `src`; returns the response to send back, if any. Never panics
    /// on any input.
    pub fn handle_datagram(&self, buf: &[u8], src: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        // ChannelData (RFC 8656 §12.4) is the hot path: parsed in place, never copied.
        if let Some(first) = buf.first()
            && first & 0xC0 == 0x40
        {
            match channel_data(buf) {
                Some((number, data)) => self.handle_channel_data(number, data, src, now),
                None => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            return None;
        }
        let mut m = Message {
            raw: buf.to_vec(),
            ..Default::default()
        };
        if m.decode().is_err() {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match (m.typ.class, m.typ.method) {
            (CLASS_INDICATION, METHOD_SEND) => {
                self.handle_send_indication(&m, src, now);
                None
            }
            (CLASS_REQUEST, METHOD_BINDING) => build(
                &m,
                MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE),
                vec![
                    Box::new(XorMappedAddress {
                        ip: src.ip(),
                        port: src.port(),
                    }),
                    Box::new(FINGERPRINT),
                ],
            ),
            (CLASS_REQUEST, METHOD_ALLOCATE) => self.handle_allocate(&m, src, now),
            (CLASS_REQUEST, METHOD_REFRESH) => self.handle_refresh(&m, src, now),
            (CLASS_REQUEST, METHOD_CREATE_PERMISSION) => self.handle_create_permission(&m, src, now),
            (CLASS_REQUEST, METHOD_CHANNEL_BIND) => self.handle_channel_bind(&m, src, now),
            (CLASS_REQUEST, method) => error(&m, method, CODE_BAD_REQUEST, "Unsupported method", None),
            _ => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    // ----- authentication -----

    /// Checks the long-term credential of `m` (RFC 8489 §9.2). `Err` carries the error response
    /// (401 with a fresh nonce, 438 stale nonce, 400 missing attributes).
    fn authenticate(&self, m: &Message, method: Method, now: Instant) -> Result<Authenticated, Option<Vec<u8>>> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return Err(self.challenge(m, method, CODE_UNAUTHORIZED, now));
        }
        let (Ok(nonce), Ok(realm), Ok(username)) = (
            TextAttribute::get_from_as(m, ATTR_NONCE),
            TextAttribute::get_from_as(m, ATTR_REALM),
            TextAttribute::get_from_as(m, ATTR_USERNAME),
        ) else {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            return Err(error(m, method, CODE_BAD_REQUEST, "Missing credentials", None));
        };
        let fresh = {
            let nonces = self.nonces.lock();
            nonces
                .get(&nonce.text)
                .is_some_and(|at| now.duration_since(*at) < NONCE_LIFETIME)
        };
        if !fresh {
            return Err(self.challenge(m, method, CODE_STALE_NONCE, now));
        }
        if realm.text != self.config.realm {
            self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            return Err(self.challenge(m, method, CODE_UNAUTHORIZED, now));
        }
        let now_ms = unix_ms();
        let secrets = self.state.secrets();
        let (identity, keys) = match credentials::long_term_keys(
            &secrets,
            self.config.secret_grace_ms,
            &username.text,
            &realm.text,
            now_ms,
        ) {
            Ok(found) => found,
            Err(UsernameError::Malformed | UsernameError::Expired) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                return Err(self.challenge(m, method, CODE_UNAUTHORIZED, now));
            }
        };
        // `check` puts the message back as it found it: one copy serves every key.
        let mut copy = Message::new();
        if m.clone_to(&mut copy).is_ok() {
            for key in keys {
                let integrity = MessageIntegrity(key);
                if integrity.check(&mut copy).is_ok() {
                    return Ok(Authenticated {
                        key: integrity.0,
                        identity: identity.to_string(),
                    });
                }
            }
        }
        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        Err(self.challenge(m, method, CODE_UNAUTHORIZED, now))
    }

    /// An error response carrying a fresh NONCE and our REALM (401, 438).
    fn challenge(&self, m: &Message, method: Method, code: ErrorCode, now: Instant) -> Option<Vec<u8>> {
        let nonce = format!("{:032x}", rand::rng().random::<u128>());
        {
            let mut nonces = self.nonces.lock();
            if nonces.len() >= NONCES_MAX {
                nonces.retain(|_, at| now.duration_since(*at) < NONCE_LIFETIME);
                if nonces.len() >= NONCES_MAX {
                    // Under a flood the oldest half goes; honest clients retry with a new one.
                    let mut ages: Vec<Instant> = nonces.values().copied().collect();
                    ages.sort_unstable();
                    let cutoff = ages[ages.len() / 2];
                    nonces.retain(|_, at| *at > cutoff);
                }
            }
            nonces.insert(nonce.clone(), now);
        }
        build(
            m,
            MessageType::new(method, CLASS_ERROR_RESPONSE),
            vec![
                Box::new(ErrorCodeAttribute {
                    code,
                    reason: reason_of(code).as_bytes().to_vec(),
                }),
                Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
                Box::new(TextAttribute::new(ATTR_REALM, self.config.realm.clone())),
            ],
        )
    }

    fn allocation(&self, src: SocketAddr) -> Option<Arc<Allocation>> {
        self.allocations.lock().get(&src).cloned()
    }

    // ----- requests -----

    fn handle_allocate(&self, m: &Message, src: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let auth = match self.authenticate(m, METHOD_ALLOCATE, now) {
            Ok(a) => a,
            Err(response) => return response,
        };
        let key = Some(auth.key.as_slice());
        if let Some(existing) = self.allocation(src) {
            if let Some((transaction, response)) = existing.created_by.lock().as_ref()
                && *transaction == m.transaction_id.0
            {
                return Some(response.clone());
            }
            return error(m, METHOD_ALLOCATE, CODE_ALLOC_MISMATCH, "Allocation Mismatch", key);
        }
        let mut transport = RequestedTransport::default();
        if transport.get_from(m).is_err() {
            return error(m, METHOD_ALLOCATE, CODE_BAD_REQUEST, "Missing REQUESTED-TRANSPORT", key);
        }
        if transport.protocol != turn::proto::PROTO_UDP {
            return error(m, METHOD_ALLOCATE, CODE_UNSUPPORTED_TRANS_PROTO, "UDP only", key);
        }
        if m.contains(ATTR_DONT_FRAGMENT) {
            return build(
                m,
                MessageType::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE),
                vec![
                    Box::new(ErrorCodeAttribute {
                        code: CODE_UNKNOWN_ATTRIBUTE,
                        reason: b"Unknown Attribute".to_vec(),
                    }),
                    Box::new(UnknownAttributes(vec![ATTR_DONT_FRAGMENT])),
                    Box::new(MessageIntegrity(auth.key)),
                ],
            );
        }
        let mut family = RequestedAddressFamily::default();
        match family.get_from(m) {
            Ok(()) if family == REQUESTED_FAMILY_IPV6 => {
                return error(m, METHOD_ALLOCATE, CODE_ADDR_FAMILY_NOT_SUPPORTED, "IPv4 only", key);
            }
            Err(stun::Error::Other(_)) => {
                return error(m, METHOD_ALLOCATE, CODE_ADDR_FAMILY_NOT_SUPPORTED, "Bad family", key);
            }
            _ => {}
        }
        if self.state.draining.load(Ordering::Relaxed) {
            self.stats.allocations_refused.fetch_add(1, Ordering::Relaxed);
            return error(m, METHOD_ALLOCATE, CODE_INSUFFICIENT_CAPACITY, "Draining", key);
        }
        {
            let allocations = self.allocations.lock();
            let mine = allocations.values().filter(|a| a.identity == auth.identity).count();
            if allocations.len() >= self.config.allocations_max || mine >= self.config.allocations_per_identity_max {
                drop(allocations);
                self.stats.allocations_refused.fetch_add(1, Ordering::Relaxed);
                return error(
                    m,
                    METHOD_ALLOCATE,
                    CODE_ALLOC_QUOTA_REACHED,
                    "Allocation Quota Reached",
                    key,
                );
            }
        }
        // EVEN-PORT asks for an even port; its R bit (reserve the next one) is not honoured: the
        // RESERVATION-TOKEN we return names no reservation, and a request carrying one gets any
        // port (RFC 8656 §7.2 lets a server pick any port when it cannot reserve).
        let even = m.contains(ATTR_EVEN_PORT) && !m.contains(ATTR_RESERVATION_TOKEN);
        let reserve = even
            && m.get(ATTR_EVEN_PORT)
                .is_ok_and(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        let Some(socket) = self.bind_relay_socket(even) else {
            self.stats.allocations_refused.fetch_add(1, Ordering::Relaxed);
            return error(
                m,
                METHOD_ALLOCATE,
                CODE_INSUFFICIENT_CAPACITY,
                "No relay port free",
                key,
            );
        };
        let Ok(local) = socket.local_addr() else {
            return error(
                m,
                METHOD_ALLOCATE,
                CODE_INSUFFICIENT_CAPACITY,
                "No relay port free",
                key,
            );
        };
        let relay_addr = SocketAddr::new(self.config.relay_public_ip, local.port());
        let lifetime = requested_lifetime(m);
        let allocation = match Allocation::new(
            src,
            auth.identity,
            relay_addr,
            socket,
            lifetime,
            self.config.allocation_bytes_per_second_max,
            now,
        ) {
            Ok(a) => Arc::new(a),
            Err(_) => return error(m, METHOD_ALLOCATE, CODE_INSUFFICIENT_CAPACITY, "No relay socket", key),
        };
        allocation.start_reader(
            Arc::clone(&self.listener),
            Arc::clone(&self.state),
            Arc::clone(&self.stats),
        );
        self.allocations.lock().insert(src, Arc::clone(&allocation));
        self.stats.allocations_total.fetch_add(1, Ordering::Relaxed);
        self.publish_count();
        let mut attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(RelayedAddress {
                ip: relay_addr.ip(),
                port: relay_addr.port(),
            }),
            Box::new(Lifetime(lifetime)),
            Box::new(XorMappedAddress {
                ip: src.ip(),
                port: src.port(),
            }),
        ];
        if reserve {
            attrs.push(Box::new(ReservationToken(rand::rng().random::<[u8; 8]>().to_vec())));
        }
        attrs.push(Box::new(MessageIntegrity(auth.key)));
        let response = build(m, MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE), attrs)?;
        *allocation.created_by.lock() = Some((m.transaction_id.0, response.clone()));
        Some(response)
    }

    fn bind_relay_socket(&self, even: bool) -> Option<std::net::UdpSocket> {
        let range = self.config.relay_ports;
        let mut rng = rand::rng();
        for _ in 0..RELAY_BIND_ATTEMPTS {
            let mut port = rng.random_range(range.min..=range.max);
            if even && port % 2 == 1 {
                port = if port > range.min { port - 1 } else { port + 1 };
                if !range.contains(port) {
                    continue;
                }
            }
            if let Ok(socket) = std::net::UdpSocket::bind(SocketAddr::new(self.config.relay_bind_ip, port)) {
                super::set_buffers(&socket, super::RELAY_SOCKET_BUFFER_BYTES);
                return Some(socket);
            }
        }
        None
    }

    fn handle_refresh(&self, m: &Message, src: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let auth = match self.authenticate(m, METHOD_REFRESH, now) {
            Ok(a) => a,
            Err(response) => return response,
        };
        let key = Some(auth.key.as_slice());
        let lifetime = requested_lifetime(m);
        let Some(allocation) = self.allocation(src) else {
            return error(m, METHOD_REFRESH, CODE_ALLOC_MISMATCH, "Allocation Mismatch", key);
        };
        if lifetime.is_zero() {
            if let Some(a) = self.allocations.lock().remove(&src) {
                a.close();
            }
            self.publish_count();
        } else {
            allocation.refresh(lifetime, now);
        }
        build(
            m,
            MessageType::new(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE),
            vec![Box::new(Lifetime(lifetime)), Box::new(MessageIntegrity(auth.key))],
        )
    }

    fn handle_create_permission(&self, m: &Message, src: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let auth = match self.authenticate(m, METHOD_CREATE_PERMISSION, now) {
            Ok(a) => a,
            Err(response) => return response,
        };
        let key = Some(auth.key.as_slice());
        let method = METHOD_CREATE_PERMISSION;
        let Some(allocation) = self.allocation(src) else {
            return error(m, method, CODE_ALLOC_MISMATCH, "Allocation Mismatch", key);
        };
        let mut peers = Vec::new();
        for attr in m.attributes.0.iter().filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS) {
            // Decode each XOR-PEER-ADDRESS on its own (the getter only reads the first).
            let mut one = Message::new();
            one.transaction_id = m.transaction_id;
            one.add(ATTR_XOR_PEER_ADDRESS, &attr.value);
            let mut peer = PeerAddress::default();
            if peer.get_from(&one).is_err() {
                return error(m, method, CODE_BAD_REQUEST, "Bad XOR-PEER-ADDRESS", key);
            }
            peers.push(peer.ip);
        }
        if peers.is_empty() {
            return error(m, method, CODE_BAD_REQUEST, "Missing XOR-PEER-ADDRESS", key);
        }
        let policy = self.state.policy();
        for ip in &peers {
            if ip.is_ipv4() != allocation.relay_addr.is_ipv4() {
                return error(
                    m,
                    method,
                    CODE_PEER_ADDR_FAMILY_MISMATCH,
                    "Peer Address Family Mismatch",
                    key,
                );
            }
            if !policy.allows_ip(*ip) {
                self.stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                return error(m, method, CODE_FORBIDDEN, "Forbidden IP", key);
            }
        }
        for ip in peers {
            if allocation.permit(ip, now).is_err() {
                return error(m, method, CODE_INSUFFICIENT_CAPACITY, "Too many permissions", key);
            }
        }
        build(
            m,
            MessageType::new(method, CLASS_SUCCESS_RESPONSE),
            vec![Box::new(MessageIntegrity(auth.key))],
        )
    }

    fn handle_channel_bind(&self, m: &Message, src: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let auth = match self.authenticate(m, METHOD_CHANNEL_BIND, now) {
            Ok(a) => a,
            Err(response) => return response,
        };
        let key = Some(auth.key.as_slice());
        let method = METHOD_CHANNEL_BIND;
        let Some(allocation) = self.allocation(src) else {
            return error(m, method, CODE_ALLOC_MISMATCH, "Allocation Mismatch", key);
        };
        let mut number = ChannelNumber::default();
        if number.get_from(m).is_err() || !number.valid() {
            return error(m, method, CODE_BAD_REQUEST, "Bad CHANNEL-NUMBER", key);
        }
        let mut peer = PeerAddress::default();
        if peer.get_from(m).is_err() {
            return error(m, method, CODE_BAD_REQUEST, "Bad XOR-PEER-ADDRESS", key);
        }
        let peer = SocketAddr::new(peer.ip, peer.port);
        if peer.is_ipv4() != allocation.relay_addr.is_ipv4() {
            return error(
                m,
                method,
                CODE_PEER_ADDR_FAMILY_MISMATCH,
                "Peer Address Family Mismatch",
                key,
            );
        }
        // A channel names one port, so the whole address is checked (a permission only has an IP).
        if !self.state.allows(peer) {
            self.stats.refused_peers.fetch_add(1, Ordering::Relaxed);
            return error(m, method, CODE_FORBIDDEN, "Forbidden IP", key);
        }
        match allocation.bind_channel(number.0, peer, now) {
            Ok(()) => build(
                m,
                MessageType::new(method, CLASS_SUCCESS_RESPONSE),
                vec![Box::new(MessageIntegrity(auth.key))],
            ),
            Err(BindError::Conflict) => error(m, method, CODE_BAD_REQUEST, "Channel bound elsewhere", key),
            Err(BindError::Full) => error(m, method, CODE_INSUFFICIENT_CAPACITY, "Too many channels", key),
        }
    }

    // ----- data (no responses) -----

    fn handle_send_indication(&self, m: &Message, src: SocketAddr, now: Instant) {
        let Some(allocation) = self.allocation(src) else {
            return;
        };
        let (mut data, mut peer) = (Data::default(), PeerAddress::default());
        if data.get_from(m).is_err() || peer.get_from(m).is_err() {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let to = Destination::Peer(SocketAddr::new(peer.ip, peer.port));
        allocation.send_to_peer(&data.0, to, &self.state, &self.stats, now);
    }

    fn handle_channel_data(&self, number: u16, data: &[u8], src: SocketAddr, now: Instant) {
        let Some(allocation) = self.allocation(src) else {
            return;
        };
        allocation.send_to_peer(data, Destination::Channel(number), &self.state, &self.stats, now);
    }
}

/// `(channel number, data)` of a ChannelData message: a number in 0x4000..=0x7FFF and a length
/// that fits the datagram (any padding after it is ignored).
fn channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    let header = buf.get(..4)?;
    let number = u16::from_be_bytes([header[0], header[1]]);
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if !(MIN_CHANNEL_NUMBER..=MAX_CHANNEL_NUMBER).contains(&number) {
        return None;
    }
    Some((number, buf.get(4..4 + length)?))
}

/// The LIFETIME asked for, capped; the default without one. Zero (a Refresh deleting) stays zero.
fn requested_lifetime(m: &Message) -> Duration {
    let mut lifetime = Lifetime::default();
    if lifetime.get_from(m).is_ok() {
        lifetime.0.min(ALLOCATION_LIFETIME_MAX)
    } else {
        DEFAULT_LIFETIME
    }
}

fn reason_of(code: ErrorCode) -> &'static str {
    match code {
        CODE_UNAUTHORIZED => "Unauthorized",
        CODE_STALE_NONCE => "Stale Nonce",
        _ => "",
    }
}

/// A response to `request` with `attrs` (the transaction id is copied).
fn build(request: &Message, typ: MessageType, attrs: Vec<Box<dyn Setter>>) -> Option<Vec<u8>> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(Message {
            transaction_id: request.transaction_id,
            ..Default::default()
        }),
        Box::new(typ),
    ];
    setters.extend(attrs);
    let mut msg = Message::new();
    msg.build(&setters).ok()?;
    Some(msg.raw)
}

/// An error response; after authentication it carries MESSAGE-INTEGRITY (`key`).
fn error(request: &Message, method: Method, code: ErrorCode, reason: &str, key: Option<&[u8]>) -> Option<Vec<u8>> {
    let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(ErrorCodeAttribute {
        code,
        reason: reason.as_bytes().to_vec(),
    })];
    if let Some(key) = key {
        attrs.push(Box::new(MessageIntegrity(key.to_vec())));
    }
    build(request, MessageType::new(method, CLASS_ERROR_RESPONSE), attrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_data_is_parsed_in_place() {
        assert_eq!(
            channel_data(&[0x40, 0x01, 0, 3, 1, 2, 3, 0]),
            Some((0x4001, &[1u8, 2, 3][..]))
        );
        assert_eq!(channel_data(&[0x7f, 0xff, 0, 0]), Some((0x7fff, &[][..])));
        assert_eq!(
            channel_data(&[0x40, 0x01, 0, 5, 1, 2, 3]),
            None,
            "longer than the datagram"
        );
        assert_eq!(channel_data(&[0x3f, 0xff, 0, 0]), None, "not a channel number");
        assert_eq!(channel_data(&[0x40, 0x01, 0]), None, "no header");
    }
}
