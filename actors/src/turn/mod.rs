//! The embedded TURN relay (RFC 8656 over UDP): one [`TurnRelay`] actor per node around a
//! [`server::RelayServer`] vendored from the `turn` crate.
//!
//! - Credentials are TURN REST ones (`credentials`), minted and verified from the secrets in the
//!   store, which the actor reads through the [`crate::ports::TurnDirectory`] port every
//!   [`REFRESH_INTERVAL`] (and at once after a rotation, [`TurnRequest::Refresh`]).
//! - The relay forwards only inside the [`policy::PeerPolicy`]: mediamesh's own media addresses
//!   (this node's and the other nodes' media port ranges, from the store's membership) plus the
//!   operator's allow-list. Invariant: **no datagram leaves a relay socket toward, or is relayed
//!   from, an address outside the policy** (`allocation::Allocation::send_to_peer` is the only
//!   sender and checks it; the reader checks every source).
//! - Datagrams never pass through the actor's mailbox: the listener's read loop and one reader
//!   task per allocation run on the node's tokio runtime; the actor only refreshes shared state.

pub mod allocation;
pub mod credentials;
pub mod policy;
pub mod server;

use crate::ids::NodeId;
use crate::ports::TurnDirectory;
use actix::prelude::*;
use credentials::TurnSecrets;
use parking_lot::RwLock;
use policy::{IpNet, PeerPolicy, PeerRule, PortRange};
use server::RelayServer;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Secrets, membership and drain state are re-read from the store this often.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Mailbox of the relay actor.
pub const TURN_MAILBOX_MAX: usize = 16;
/// Kernel buffers asked for on the listener (every client's datagrams queue there; the kernel
/// caps it at `net.core.rmem_max`/`wmem_max`).
pub const LISTENER_BUFFER_BYTES: usize = 4 << 20;
/// Kernel buffers asked for on each relay socket.
pub const RELAY_SOCKET_BUFFER_BYTES: usize = 1 << 20;

/// Asks for `bytes` of receive and send buffer on `socket` (best effort: the kernel may give less).
pub fn set_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
}

/// Settings of the relay server itself.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// REALM of every challenge; requests with another realm get 401.
    pub realm: String,
    /// IP relay sockets bind to (the listener's).
    pub relay_bind_ip: IpAddr,
    /// IP told to clients in XOR-RELAYED-ADDRESS (the node's advertised address).
    pub relay_public_ip: IpAddr,
    /// Ports of relay sockets.
    pub relay_ports: PortRange,
    /// Allocations one identity (the username's part after the expiry) holds at most.
    pub allocations_per_identity_max: usize,
    /// Allocations this relay holds at most.
    pub allocations_max: usize,
    /// Bytes per second one allocation relays at most, both directions together (0: no cap).
    pub allocation_bytes_per_second_max: u64,
    /// The previous secret is accepted this long after a rotation.
    pub secret_grace_ms: u64,
}

/// Counters, read by the edge's metrics at scrape time.
#[derive(Debug, Default)]
pub struct TurnStats {
    /// Allocations held now (a gauge).
    pub allocations: AtomicU64,
    pub allocations_total: AtomicU64,
    /// Allocate requests refused for quota, drain or no free relay port.
    pub allocations_refused: AtomicU64,
    pub packets_to_peers: AtomicU64,
    pub bytes_to_peers: AtomicU64,
    pub packets_to_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    /// Requests whose credentials failed (integrity, expiry, realm, missing attributes).
    pub auth_failures: AtomicU64,
    /// Permissions, channels and datagrams refused by the peer policy.
    pub refused_peers: AtomicU64,
    pub dropped_no_permission: AtomicU64,
    pub dropped_over_bandwidth: AtomicU64,
    /// Datagrams that were neither STUN nor ChannelData, or malformed.
    pub malformed: AtomicU64,
}

/// What the relay's owner changes while it runs; shared with the server and its tasks.
#[derive(Debug, Default)]
pub struct RelayState {
    secrets: RwLock<TurnSecrets>,
    policy: RwLock<Arc<PeerPolicy>>,
    relays: RwLock<Vec<RelayEndpoint>>,
    /// A draining node's relay takes no new allocations.
    pub draining: AtomicBool,
}

impl RelayState {
    pub fn new(secrets: TurnSecrets, policy: PeerPolicy) -> RelayState {
        RelayState {
            secrets: RwLock::new(secrets),
            policy: RwLock::new(Arc::new(policy)),
            ..Default::default()
        }
    }

    pub fn secrets(&self) -> TurnSecrets {
        self.secrets.read().clone()
    }

    pub fn policy(&self) -> Arc<PeerPolicy> {
        Arc::clone(&self.policy.read())
    }

    /// Whether the current policy allows `addr` (per datagram: no clone of the policy).
    pub fn allows(&self, addr: SocketAddr) -> bool {
        self.policy.read().allows(addr)
    }
}

/// A relay clients may be offered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEndpoint {
    pub node: NodeId,
    pub region: String,
    pub addr: SocketAddr,
}

/// One node of the mesh as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshNode {
    pub id: NodeId,
    pub region: String,
    /// Heartbeating and not draining.
    pub available: bool,
    /// Where its media sockets listen, if it announced it.
    pub media: Option<(IpAddr, PortRange)>,
    /// Its TURN relay, if it runs one.
    pub turn: Option<SocketAddr>,
}

/// What the relay reads from the store on every refresh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshView {
    pub nodes: Vec<MeshNode>,
    /// This node is being drained.
    pub draining: bool,
}

/// An ICE server handed to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IceServer {
    /// `turn:HOST:PORT?transport=udp`.
    pub url: String,
    pub username: String,
    pub credential: String,
}

/// Settings of the [`TurnRelay`] actor.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    pub relay: RelayConfig,
    pub node: NodeId,
    pub region: String,
    /// This relay's address as clients reach it.
    pub public_addr: SocketAddr,
    /// This node's own media sockets (always part of the peer policy).
    pub own_media: PeerRule,
    /// Peers the operator allows on top of the mesh.
    pub allow: Vec<PeerRule>,
    /// Only relays whose IP is inside one of these are offered (empty: any).
    pub offer_ranges: Vec<IpNet>,
    /// Lifetime of minted credentials.
    pub credential_ttl: Duration,
}

/// The cheap, cloneable side of the relay the edge uses to mint ICE servers and read counters.
#[derive(Clone)]
pub struct TurnHandle {
    state: Arc<RelayState>,
    pub stats: Arc<TurnStats>,
    region: String,
    credential_ttl: Duration,
}

impl TurnHandle {
    /// ICE servers for `identity`: every offerable relay, those of `preferred_region` (else this
    /// node's region) first, each with a fresh credential. Empty until the secret is loaded.
    pub fn ice_servers(&self, identity: &str, preferred_region: Option<&str>) -> Vec<IceServer> {
        let secrets = self.state.secrets();
        if secrets.current.is_empty() {
            return Vec::new();
        }
        let expires_at_s = unix_ms() / 1000 + self.credential_ttl.as_secs();
        let region = preferred_region.unwrap_or(&self.region);
        // Every relay verifies with the same secret: one credential serves them all.
        let c = credentials::mint(&secrets.current, identity, expires_at_s);
        let mut relays = self.state.relays.read().clone();
        // Stable: within a region the order of `relays` (this node first) is kept.
        relays.sort_by_key(|r| r.region != region);
        relays
            .into_iter()
            .map(|r| IceServer {
                url: format!("turn:{}?transport=udp", r.addr),
                username: c.username.clone(),
                credential: c.password.clone(),
            })
            .collect()
    }

    /// Whether the secrets have been read from the store.
    pub fn is_ready(&self) -> bool {
        !self.state.secrets.read().current.is_empty()
    }
}

/// Requests to the relay actor.
#[derive(Message)]
#[rtype(result = "()")]
pub enum TurnRequest {
    /// Re-read the store now (after a rotation on this node).
    Refresh,
    /// End every allocation and stop (the node shuts down).
    Stop,
}

/// The per-node TURN relay actor.
pub struct TurnRelay {
    config: TurnConfig,
    server: Arc<RelayServer>,
    state: Arc<RelayState>,
    directory: Arc<dyn TurnDirectory>,
    read_loop: Option<tokio::task::JoinHandle<()>>,
    /// Number of the latest refresh started; only its result is applied.
    refresh_generation: u64,
    /// A refresh is in flight (the periodic one then waits for it).
    refreshing: bool,
}

impl TurnRelay {
    /// Starts the relay on an already-bound listener (inside a tokio runtime). Returns the actor
    /// and the handle the edge keeps.
    pub fn start(
        config: TurnConfig,
        listener: std::net::UdpSocket,
        directory: Arc<dyn TurnDirectory>,
    ) -> std::io::Result<(Addr<TurnRelay>, TurnHandle)> {
        listener.set_nonblocking(true)?;
        set_buffers(&listener, LISTENER_BUFFER_BYTES);
        let listener = Arc::new(tokio::net::UdpSocket::from_std(listener)?);
        let state = Arc::new(RelayState::new(
            TurnSecrets::default(),
            policy_of(&config, &MeshView::default()),
        ));
        let stats = Arc::new(TurnStats::default());
        let server = Arc::new(RelayServer::new(
            config.relay.clone(),
            listener,
            Arc::clone(&state),
            Arc::clone(&stats),
        ));
        let handle = TurnHandle {
            state: Arc::clone(&state),
            stats,
            region: config.region.clone(),
            credential_ttl: config.credential_ttl,
        };
        let actor = TurnRelay {
            config,
            server,
            state,
            directory,
            read_loop: None,
            refresh_generation: 0,
            refreshing: false,
        };
        let addr = Actor::start(actor);
        Ok((addr, handle))
    }

    /// Re-reads the store. A refresh in flight is superseded: its result, possibly read before a
    /// rotation, is dropped when it comes back.
    fn refresh(&mut self, ctx: &mut Context<Self>) {
        self.refresh_generation += 1;
        self.refreshing = true;
        let generation = self.refresh_generation;
        let directory = Arc::clone(&self.directory);
        async move { (directory.secrets().await, directory.mesh().await) }
            .into_actor(self)
            .map(move |(secrets, mesh), this, _| {
                if generation != this.refresh_generation {
                    return;
                }
                this.refreshing = false;
                match secrets {
                    Ok(s) if !s.current.is_empty() => *this.state.secrets.write() = s,
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "TURN secrets not read"),
                }
                match mesh {
                    Ok(mesh) => this.apply(&mesh),
                    Err(error) => tracing::debug!(%error, "mesh not read"),
                }
            })
            .spawn(ctx);
    }

    fn apply(&mut self, mesh: &MeshView) {
        *self.state.policy.write() = Arc::new(policy_of(&self.config, mesh));
        self.state.draining.store(mesh.draining, Ordering::Relaxed);
        *self.state.relays.write() = offerable(&self.config, mesh);
    }
}

/// The peer policy: this node's media, every other node's media, the allow-list.
fn policy_of(config: &TurnConfig, mesh: &MeshView) -> PeerPolicy {
    let mut rules = vec![config.own_media];
    rules.extend(
        mesh.nodes
            .iter()
            .filter(|n| n.id != config.node)
            .filter_map(|n| n.media)
            .map(|(ip, ports)| PeerRule {
                net: IpNet::host(ip),
                ports,
            }),
    );
    rules.extend(config.allow.iter().copied());
    PeerPolicy::new(rules)
}

/// Relays that may be offered: available nodes with a relay inside the offer ranges, this node
/// first (unless draining), then the others in membership order.
fn offerable(config: &TurnConfig, mesh: &MeshView) -> Vec<RelayEndpoint> {
    let in_ranges = |ip: IpAddr| config.offer_ranges.is_empty() || config.offer_ranges.iter().any(|r| r.contains(ip));
    let mut relays = Vec::new();
    if !mesh.draining && in_ranges(config.public_addr.ip()) {
        relays.push(RelayEndpoint {
            node: config.node.clone(),
            region: config.region.clone(),
            addr: config.public_addr,
        });
    }
    relays.extend(
        mesh.nodes
            .iter()
            .filter(|n| n.id != config.node && n.available)
            .filter_map(|n| {
                n.turn.filter(|a| in_ranges(a.ip())).map(|addr| RelayEndpoint {
                    node: n.id.clone(),
                    region: n.region.clone(),
                    addr,
                })
            }),
    );
    relays
}

impl Actor for TurnRelay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(TURN_MAILBOX_MAX);
        self.read_loop = Some(tokio::spawn(Arc::clone(&self.server).run()));
        self.refresh(ctx);
        ctx.run_interval(REFRESH_INTERVAL, |this, ctx| {
            this.server.sweep(Instant::now());
            if !this.refreshing {
                this.refresh(ctx);
            }
        });
        tracing::info!(
            addr = %self.config.public_addr,
            relay_ports = %format!("{}-{}", self.config.relay.relay_ports.min, self.config.relay.relay_ports.max),
            "TURN relay started"
        );
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(task) = self.read_loop.take() {
            task.abort();
        }
        self.server.close_all();
    }
}

impl Handler<TurnRequest> for TurnRelay {
    type Result = ();

    fn handle(&mut self, request: TurnRequest, ctx: &mut Context<Self>) {
        match request {
            TurnRequest::Refresh => self.refresh(ctx),
            TurnRequest::Stop => ctx.stop(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
