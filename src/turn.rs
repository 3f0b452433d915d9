//! The edge of the TURN relay: its port over the store ([`StoreTurnDirectory`]), the secret's
//! creation and rotation, and how ICE servers are told to clients (RFC 9725 `Link` headers).

use futures::FutureExt;
use futures::future::BoxFuture;
use mediamesh_actors::NodeId;
use mediamesh_actors::ports::TurnDirectory;
use mediamesh_actors::turn::credentials::TurnSecrets;
use mediamesh_actors::turn::policy::PortRange;
use mediamesh_actors::turn::{IceServer, MeshNode, MeshView};
use mediamesh_cluster::{Consistency, NodeState, Store};

/// The relay's view of the store.
pub struct StoreTurnDirectory {
    store: Store,
    node: String,
}

impl StoreTurnDirectory {
    pub fn new(store: Store, node: String) -> Self {
        Self { store, node }
    }
}

fn convert(s: mediamesh_cluster::TurnSecrets) -> TurnSecrets {
    TurnSecrets {
        current: s.current,
        previous: s.previous,
        rotated_at_ms: s.rotated_at_ms,
    }
}

/// Rotates the secret in the store (to `secret`, or a generated one).
pub async fn rotate(store: &Store, secret: Option<String>) -> Result<TurnSecrets, mediamesh_cluster::StoreError> {
    let secret = secret.unwrap_or_else(crate::config::generate_secret);
    store.rotate_turn_secret(secret).await.map(convert)
}

impl TurnDirectory for StoreTurnDirectory {
    fn secrets(&self) -> BoxFuture<'static, Result<TurnSecrets, String>> {
        let store = self.store.clone();
        async move {
            if let Some(s) = store
                .turn_secrets(Consistency::Local)
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(convert(s));
            }
            if !store.is_ready() {
                return Err("store not ready".into());
            }
            // First start of the cluster: create the secret. Two nodes racing here rotate twice;
            // the first secret then stays valid as the previous one for the grace period.
            match store
                .turn_secrets(Consistency::Linearizable)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(s) => Ok(convert(s)),
                None => rotate(&store, None).await.map_err(|e| e.to_string()),
            }
        }
        .boxed()
    }

    fn mesh(&self) -> BoxFuture<'static, Result<MeshView, String>> {
        let nodes = self.store.nodes();
        let me = self.node.clone();
        async move {
            let draining = nodes.iter().any(|n| n.id.0 == me && n.state == NodeState::Draining);
            let nodes = nodes
                .into_iter()
                .map(|n| MeshNode {
                    id: NodeId(n.id.0),
                    region: n.region,
                    available: n.state == NodeState::Alive,
                    media: n.media_ip.parse().ok().and_then(|ip| {
                        let (min, max) = n.media_ports;
                        (min > 0 && min <= max).then_some((ip, PortRange { min, max }))
                    }),
                    turn: n.turn_addr.parse().ok(),
                })
                .collect();
            Ok(MeshView { nodes, draining })
        }
        .boxed()
    }
}

/// A `quoted-string` (RFC 9110 §5.6.4).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `Link: <turn:HOST:PORT?transport=udp>; rel="ice-server"; username=...; credential=...;
/// credential-type="password"` (RFC 9725 §4.6).
pub fn link_header(server: &IceServer) -> String {
    format!(
        "<{}>; rel=\"ice-server\"; username={}; credential={}; credential-type=\"password\"",
        server.url,
        quoted(&server.username),
        quoted(&server.credential)
    )
}

/// The relay's counters in the node's registry, mirrored at scrape time.
pub struct TurnMetrics {
    stats: std::sync::Arc<mediamesh_actors::turn::TurnStats>,
    allocations: prometheus::IntGauge,
    allocations_total: prometheus::IntCounter,
    allocations_refused: prometheus::IntCounter,
    packets: prometheus::IntCounterVec,
    bytes: prometheus::IntCounterVec,
    auth_failures: prometheus::IntCounter,
    refused_peers: prometheus::IntCounter,
    dropped: prometheus::IntCounterVec,
}

impl TurnMetrics {
    pub fn new(
        registry: &prometheus::Registry,
        stats: std::sync::Arc<mediamesh_actors::turn::TurnStats>,
    ) -> TurnMetrics {
        use crate::metrics::{counter, gauge, register};
        use prometheus::{IntCounterVec, Opts};
        let vec = |name: &str, help: &str, label: &str| {
            register(registry, IntCounterVec::new(Opts::new(name, help), &[label]))
        };
        TurnMetrics {
            allocations: gauge(
                registry,
                "mediamesh_turn_allocations",
                "TURN allocations held by this relay",
            ),
            allocations_total: counter(registry, "mediamesh_turn_allocations_total", "TURN allocations created"),
            allocations_refused: counter(
                registry,
                "mediamesh_turn_allocations_refused_total",
                "TURN Allocate requests refused (quota, draining, no relay port)",
            ),
            packets: vec(
                "mediamesh_turn_relayed_packets_total",
                "Datagrams relayed, by direction (to_peer, to_client)",
                "direction",
            ),
            bytes: vec(
                "mediamesh_turn_relayed_bytes_total",
                "Payload bytes relayed, by direction (to_peer, to_client)",
                "direction",
            ),
            auth_failures: counter(
                registry,
                "mediamesh_turn_auth_failures_total",
                "TURN requests with bad credentials (integrity, expiry, realm)",
            ),
            refused_peers: counter(
                registry,
                "mediamesh_turn_refused_peers_total",
                "Permissions, channels and datagrams refused by the peer policy",
            ),
            dropped: vec(
                "mediamesh_turn_dropped_packets_total",
                "Datagrams not relayed, by reason (no_permission, bandwidth, malformed)",
                "reason",
            ),
            stats,
        }
    }

    pub fn sync(&self) {
        use crate::metrics::Metrics;
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        self.allocations.set(s.allocations.load(Relaxed) as i64);
        Metrics::sync_counter(&self.allocations_total, s.allocations_total.load(Relaxed));
        Metrics::sync_counter(&self.allocations_refused, s.allocations_refused.load(Relaxed));
        for (direction, packets, bytes) in [
            ("to_peer", &s.packets_to_peers, &s.bytes_to_peers),
            ("to_client", &s.packets_to_clients, &s.bytes_to_clients),
        ] {
            Metrics::sync_counter(&self.packets.with_label_values(&[direction]), packets.load(Relaxed));
            Metrics::sync_counter(&self.bytes.with_label_values(&[direction]), bytes.load(Relaxed));
        }
        Metrics::sync_counter(&self.auth_failures, s.auth_failures.load(Relaxed));
        Metrics::sync_counter(&self.refused_peers, s.refused_peers.load(Relaxed));
        for (reason, value) in [
            ("no_permission", &s.dropped_no_permission),
            ("bandwidth", &s.dropped_over_bandwidth),
            ("malformed", &s.malformed),
        ] {
            Metrics::sync_counter(&self.dropped.with_label_values(&[reason]), value.load(Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_form() {
        let h = link_header(&IceServer {
            url: "turn:127.0.0.1:3478?transport=udp".into(),
            username: "1700000000:a\"b".into(),
            credential: "pw==".into(),
        });
        assert_eq!(
            h,
            "<turn:127.0.0.1:3478?transport=udp>; rel=\"ice-server\"; username=\"1700000000:a\\\"b\"; \
             credential=\"pw==\"; credential-type=\"password\""
        );
    }
}
