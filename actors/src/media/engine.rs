//! Building peer connections: codecs, interceptors, DTLS role, the node's media address and a
//! port from the configured range. webrtc 0.21 has no single-port mux, so every connection
//! leases one UDP port from [`PortPool`] and returns it when dropped.

use super::feedback::{FeedbackState, FeedbackTap};
use parking_lot::Mutex;
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_nack, configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::transport::RTCDtlsRole;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    SettingEngineBuilder,
};
use webrtc::runtime::{Runtime, TokioRuntime};

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no free media port in {0}-{1}")]
    PortsExhausted(u16, u16),
    #[error("session description rejected: {0}")]
    Negotiation(String),
    #[error("webrtc: {0}")]
    WebRtc(String),
    #[error("ICE gathering did not complete within {0:?}")]
    GatheringTimeout(Duration),
}

impl From<webrtc::error::Error> for MediaError {
    fn from(error: webrtc::error::Error) -> Self {
        MediaError::WebRtc(error.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Address the media sockets bind to and announce as host candidates.
    pub ip: IpAddr,
    pub port_min: u16,
    pub port_max: u16,
    /// Upper bound on how long connection set-up waits for local candidates.
    pub gathering_timeout: Duration,
}

/// The UDP ports this node's connections use; one lease per connection.
#[derive(Debug)]
pub struct PortPool {
    ip: IpAddr,
    port_min: u16,
    port_max: u16,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    in_use: HashSet<u16>,
    cursor: u16,
}

/// A leased port; returned to the pool on drop.
#[derive(Debug)]
pub struct PortLease {
    pool: Arc<PortPool>,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.pool.state.lock().in_use.remove(&self.port);
    }
}

impl PortPool {
    pub fn new(ip: IpAddr, port_min: u16, port_max: u16) -> Arc<Self> {
        assert!(port_min <= port_max, "validated when the configuration is read");
        Arc::new(Self {
            ip,
            port_min,
            port_max,
            state: Mutex::new(PoolState {
                in_use: HashSet::new(),
                cursor: port_min,
            }),
        })
    }

    pub fn in_use(&self) -> usize {
        self.state.lock().in_use.len()
    }

    /// Leases a port that is free in the pool and bindable right now (another process may hold
    /// ports of the range). Walks the range round-robin so a just-released port rests a while.
    pub fn lease(self: &Arc<Self>) -> Result<PortLease, MediaError> {
        let mut state = self.state.lock();
        let span = u32::from(self.port_max - self.port_min) + 1;
        for _ in 0..span {
            let port = state.cursor;
            state.cursor = if port >= self.port_max { self.port_min } else { port + 1 };
            if state.in_use.contains(&port) {
                continue;
            }
            if UdpSocket::bind(SocketAddr::new(self.ip, port)).is_err() {
                continue;
            }
            state.in_use.insert(port);
            return Ok(PortLease {
                pool: Arc::clone(self),
                port,
            });
        }
        Err(MediaError::PortsExhausted(self.port_min, self.port_max))
    }
}

/// Ports tried for one connection before giving up.
const BIND_ATTEMPTS_MAX: usize = 3;

/// webrtc's error when none of the given addresses could be bound.
fn is_bind_failure(error: &MediaError) -> bool {
    error.to_string().contains("no udp_sockets")
}

/// Which side of the SFU a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// Sends media to us (WHIP): simulcast extensions and transport-cc feedback for its
    /// bandwidth estimate.
    Publisher,
    /// Receives media from us (WHEP): REMB and receiver reports feed our estimate of its link.
    Subscriber,
}

pub struct PeerFactory {
    config: MediaConfig,
    ports: Arc<PortPool>,
    runtime: Arc<dyn Runtime>,
}

impl PeerFactory {
    pub fn new(config: MediaConfig) -> Self {
        let ports = PortPool::new(config.ip, config.port_min, config.port_max);
        Self {
            config,
            ports,
            runtime: Arc::new(TokioRuntime),
        }
    }

    pub fn ports(&self) -> &Arc<PortPool> {
        &self.ports
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    /// Builds a connection that will answer `offer_sdp`.
    pub async fn build(
        &self,
        role: PeerRole,
        offer_sdp: &str,
        handler: Arc<dyn PeerConnectionEventHandler>,
        feedback: Arc<FeedbackState>,
    ) -> Result<(Arc<dyn PeerConnection>, PortLease), MediaError> {
        // The lease probed its port, but another process may take it before the connection binds
        // it: then try the next one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = self.ports.lease()?;
            match self
                .build_on(
                    role,
                    offer_sdp,
                    Arc::clone(&handler),
                    Arc::clone(&feedback),
                    lease.port(),
                )
                .await
            {
                Ok(peer) => return Ok((peer, lease)),
                Err(error) if attempt < BIND_ATTEMPTS_MAX && is_bind_failure(&error) => {
                    tracing::debug!(port = lease.port(), %error, "media port taken meanwhile; trying another");
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn build_on(
        &self,
        role: PeerRole,
        offer_sdp: &str,
        handler: Arc<dyn PeerConnectionEventHandler>,
        feedback: Arc<FeedbackState>,
        port: u16,
    ) -> Result<Arc<dyn PeerConnection>, MediaError> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let mut registry = configure_nack(Registry::new(), &mut media_engine);
        registry = configure_rtcp_reports(registry);
        if role == PeerRole::Publisher {
            configure_simulcast_extension_headers(&mut media_engine)?;
            registry = configure_twcc_receiver_only(registry, &mut media_engine)?;
        }
        registry = registry.with(Slot::from(14_000), FeedbackTap::new(feedback));

        let mut settings = SettingEngineBuilder::new()
            .with_answering_dtls_role(answering_dtls_role(offer_sdp))
            .with_ice_timeouts(
                Some(Duration::from_secs(5)),
                Some(Duration::from_secs(25)),
                Some(Duration::from_secs(2)),
            );
        if self.config.ip.is_loopback() {
            settings = settings.with_include_loopback_candidate(true);
        }
        let peer = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(settings.build())
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_runtime(Arc::clone(&self.runtime))
            .with_udp_addrs(vec![SocketAddr::new(self.config.ip, port)])
            .build()
            .await?;
        Ok(Arc::new(peer))
    }
}

/// RFC 5763 §5: answer `passive` to `actpass` (what Chromium, aiortc and GStreamer expect),
/// and the opposite of an explicit role (FFmpeg's WHIP muxer offers `passive`).
pub fn answering_dtls_role(offer_sdp: &str) -> RTCDtlsRole {
    let setup = offer_sdp
        .lines()
        .find_map(|line| line.trim().strip_prefix("a=setup:"))
        .map(str::trim);
    match setup {
        Some("passive") => RTCDtlsRole::Client,
        _ => RTCDtlsRole::Server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn dtls_role_follows_offer() {
        assert_eq!(answering_dtls_role("v=0\r\na=setup:actpass\r\n"), RTCDtlsRole::Server);
        assert_eq!(answering_dtls_role("v=0\r\na=setup:passive\r\n"), RTCDtlsRole::Client);
        assert_eq!(answering_dtls_role("v=0\r\na=setup:active\r\n"), RTCDtlsRole::Server);
    }

    #[test]
    fn pool_leases_distinct_ports_and_reuses_released_ones() {
        let pool = PortPool::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 47_100, 47_102);
        let a = pool.lease().expect("free port");
        let b = pool.lease().expect("free port");
        let c = pool.lease().expect("free port");
        assert_ne!(a.port(), b.port());
        assert!(pool.lease().is_err(), "range of three is exhausted");
        drop(b);
        assert_eq!(pool.in_use(), 2);
        assert!(pool.lease().is_ok());
        drop((a, c));
    }
}
