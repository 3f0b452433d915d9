//! One TURN allocation: its relay socket, permissions, channel bindings, bandwidth bucket and the
//! task that relays what peers send back to the client.
//!
//! Derived from the `turn` crate 0.17.2 (`src/allocation/*`, <https://github.com/webrtc-rs/webrtc>),
//! Copyright (c) 2021 WebRTC.rs, licensed MIT OR Apache-2.0; used here under the MIT licence
//! (see the crate's LICENSE-MIT). Changes: timers are expiry instants checked on use and swept by
//! the server instead of a task per permission; every packet, both ways, passes the peer policy
//! ([`super::policy::PeerPolicy`]) and a per-allocation token bucket, and is counted.

use super::{RelayState, TurnStats};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::message::{CLASS_INDICATION, METHOD_DATA, Message, MessageType, Setter};
use tokio::net::UdpSocket;
use turn::proto::data::Data;
use turn::proto::peeraddr::PeerAddress;

/// Permissions one allocation holds at most (RFC 8656 §9 leaves it to the server).
pub const PERMISSIONS_PER_ALLOCATION_MAX: usize = 128;
/// Channel bindings one allocation holds at most.
pub const CHANNELS_PER_ALLOCATION_MAX: usize = 128;
/// A permission lasts this long unless refreshed (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// A channel binding lasts this long unless refreshed (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// Largest datagram relayed.
pub const DATAGRAM_BYTES_MAX: usize = 1500;

/// What an allocation's client asked for: channels and permissions, with their expiries.
struct Bindings {
    expires_at: Instant,
    permissions: HashMap<IpAddr, Instant>,
    /// Channel number → (peer, expiry).
    channels: HashMap<u16, (SocketAddr, Instant)>,
    bucket: TokenBucket,
}

/// Where a client's datagram goes: the peer of a Send indication, or a bound channel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Peer(SocketAddr),
    Channel(u16),
}

/// Why a binding request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// The number is bound to another peer, or the peer to another number (RFC 8656 §12.2).
    Conflict,
    /// Too many permissions or channels.
    Full,
}

pub struct Allocation {
    pub client: SocketAddr,
    pub identity: String,
    /// Address told to the client (the node's advertised IP, the socket's port).
    pub relay_addr: SocketAddr,
    /// Receives from peers (the reader task).
    socket: Arc<UdpSocket>,
    /// The same socket, for sending: a non-blocking `sendto` straight away, with no readiness
    /// bookkeeping on the client's path.
    sender: std::net::UdpSocket,
    bindings: Mutex<Bindings>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Transaction id and success response of the Allocate that made it: a retransmission gets
    /// the same answer (RFC 8656 §7.2), not 437.
    pub(crate) created_by: Mutex<Option<([u8; 12], Vec<u8>)>>,
}

impl Allocation {
    pub fn new(
        client: SocketAddr,
        identity: String,
        relay_addr: SocketAddr,
        socket: std::net::UdpSocket,
        lifetime: Duration,
        bytes_per_second_max: u64,
        now: Instant,
    ) -> std::io::Result<Allocation> {
        socket.set_nonblocking(true)?;
        let sender = socket.try_clone()?;
        Ok(Allocation {
            client,
            identity,
            relay_addr,
            socket: Arc::new(UdpSocket::from_std(socket)?),
            sender,
            bindings: Mutex::new(Bindings {
                expires_at: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                bucket: TokenBucket::new(bytes_per_second_max, now),
            }),
            reader: Mutex::new(None),
            created_by: Mutex::new(None),
        })
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.bindings.lock().expires_at <= now
    }

    pub fn refresh(&self, lifetime: Duration, now: Instant) {
        self.bindings.lock().expires_at = now + lifetime;
    }

    /// Installs or refreshes a permission for `ip`.
    pub fn permit(&self, ip: IpAddr, now: Instant) -> Result<(), BindError> {
        let mut b = self.bindings.lock();
        b.permissions.retain(|_, expiry| *expiry > now);
        if b.permissions.len() >= PERMISSIONS_PER_ALLOCATION_MAX && !b.permissions.contains_key(&ip) {
            return Err(BindError::Full);
        }
        b.permissions.insert(ip, now + PERMISSION_LIFETIME);
        Ok(())
    }

    /// Binds (or refreshes) channel `number` to `peer`, and the permission of its IP.
    pub fn bind_channel(&self, number: u16, peer: SocketAddr, now: Instant) -> Result<(), BindError> {
        {
            let mut b = self.bindings.lock();
            b.channels.retain(|_, (_, expiry)| *expiry > now);
            if let Some((bound, _)) = b.channels.get(&number)
                && *bound != peer
            {
                return Err(BindError::Conflict);
            }
            if b.channels.iter().any(|(n, (p, _))| *p == peer && *n != number) {
                return Err(BindError::Conflict);
            }
            if b.channels.len() >= CHANNELS_PER_ALLOCATION_MAX && !b.channels.contains_key(&number) {
                return Err(BindError::Full);
            }
            b.channels.insert(number, (peer, now + CHANNEL_LIFETIME));
        }
        self.permit(peer.ip(), now)
    }

    fn permitted(b: &Bindings, ip: IpAddr, now: Instant) -> bool {
        b.permissions.get(&ip).is_some_and(|e| *e > now)
    }

    /// Relays `data` from the client to `to`. The one place a relay socket sends: the peer
    /// policy is read from `state` and checked here whatever the caller checked before (defence
    /// in depth). The channel, the permission and the bandwidth are checked under one lock.
    pub fn send_to_peer(&self, data: &[u8], to: Destination, state: &RelayState, stats: &TurnStats, now: Instant) {
        let peer = {
            let mut b = self.bindings.lock();
            let peer = match to {
                Destination::Peer(peer) => peer,
                Destination::Channel(number) => match b.channels.get(&number).filter(|(_, e)| *e > now) {
                    Some((peer, _)) => *peer,
                    None => {
                        stats.dropped_no_permission.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
            };
            if !state.allows(peer) {
                stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !Self::permitted(&b, peer.ip(), now) {
                stats.dropped_no_permission.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !b.bucket.take(data.len(), now) {
                stats.dropped_over_bandwidth.fetch_add(1, Ordering::Relaxed);
                return;
            }
            peer
        };
        // A full socket buffer drops the datagram, as the network would.
        if self.sender.send_to(data, peer).is_ok() {
            stats.packets_to_peers.fetch_add(1, Ordering::Relaxed);
            stats.bytes_to_peers.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }

    /// Starts the task relaying peer datagrams to the client through `listener`.
    pub fn start_reader(self: &Arc<Self>, listener: Arc<UdpSocket>, state: Arc<RelayState>, stats: Arc<TurnStats>) {
        let allocation = Arc::clone(self);
        let task = tokio::spawn(async move { allocation.read_peers(listener, state, stats).await });
        *self.reader.lock() = Some(task);
    }

    async fn read_peers(&self, listener: Arc<UdpSocket>, state: Arc<RelayState>, stats: Arc<TurnStats>) {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        let mut out = Vec::with_capacity(DATAGRAM_BYTES_MAX + 4);
        loop {
            let (n, peer) = match self.socket.recv_from(&mut buf).await {
                Ok(v) => v,
                // An ICMP error for an earlier send: not the socket's end.
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset) => continue,
                Err(_) => return,
            };
            let now = Instant::now();
            if !state.allows(peer) {
                stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let channel = {
                let mut b = self.bindings.lock();
                let channel = b
                    .channels
                    .iter()
                    .find(|(_, (p, e))| *p == peer && *e > now)
                    .map(|(n, _)| *n);
                if channel.is_none() && !Self::permitted(&b, peer.ip(), now) {
                    stats.dropped_no_permission.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !b.bucket.take(n, now) {
                    stats.dropped_over_bandwidth.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                channel
            };
            out.clear();
            match channel {
                Some(number) => encode_channel_data(number, &buf[..n], &mut out),
                None => match data_indication(peer, &buf[..n]) {
                    Some(raw) => out = raw,
                    None => continue,
                },
            }
            if listener.send_to(&out, self.client).await.is_ok() {
                stats.packets_to_clients.fetch_add(1, Ordering::Relaxed);
                stats.bytes_to_clients.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    /// Drops expired permissions and channels.
    pub fn sweep(&self, now: Instant) {
        let mut b = self.bindings.lock();
        b.permissions.retain(|_, e| *e > now);
        b.channels.retain(|_, (_, e)| *e > now);
    }

    /// Stops relaying; the socket closes when the last reference goes (the reader task holds one,
    /// so this must be called when the allocation is removed).
    pub fn close(&self) {
        if let Some(task) = self.reader.lock().take() {
            task.abort();
        }
    }
}

/// ChannelData (RFC 8656 §12.4): number, length, data, padded to 4 bytes (UDP may omit the
/// padding, but coturn and browsers accept it either way).
pub fn encode_channel_data(number: u16, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&number.to_be_bytes());
    // Datagrams are at most DATAGRAM_BYTES_MAX long.
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn data_indication(peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    let mut msg = Message::new();
    let setters: [Box<dyn Setter>; 4] = [
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_DATA, CLASS_INDICATION)),
        Box::new(PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        }),
        Box::new(Data(data.to_vec())),
    ];
    msg.build(&setters).ok()?;
    Some(msg.raw)
}

/// Bytes-per-second cap with a one-second burst. A rate of 0 is unlimited.
struct TokenBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate as f64,
            at: now,
        }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_caps_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert!(b.take(1000, t0));
        assert!(!b.take(1, t0));
        assert!(b.take(500, t0 + Duration::from_millis(500)));
        let mut unlimited = TokenBucket::new(0, t0);
        assert!(unlimited.take(usize::MAX, t0));
    }

    #[test]
    fn channel_data_is_padded() {
        let mut out = Vec::new();
        encode_channel_data(0x4001, b"abcde", &mut out);
        assert_eq!(out.len(), 12);
        assert_eq!(&out[..4], &[0x40, 0x01, 0, 5]);
    }
}
