//! The store's Prometheus instruments. They are created here, unregistered; the node adds them
//! to its registry, so several stores in one process (tests) do not collide.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

/// Bounds of the commit latency histogram, in seconds (sub-millisecond local commits up to
/// multi-second stalls).
const COMMIT_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// From proposal to apply on the proposing node.
    pub commit_seconds: Histogram,
    pub leader_changes: IntCounter,
    pub is_leader: IntGauge,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        // The names and buckets are static and valid, so construction cannot fail.
        Self {
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "mediamesh_raft_commit_seconds",
                    "Time from proposing a Raft entry to applying it on this node",
                )
                .buckets(COMMIT_BUCKETS.to_vec()),
            )
            .expect("static histogram options"),
            leader_changes: IntCounter::new(
                "mediamesh_raft_leader_changes_total",
                "Changes of the Raft leader seen by this node",
            )
            .expect("static counter options"),
            is_leader: IntGauge::new("mediamesh_raft_is_leader", "1 when this node is the Raft leader")
                .expect("static gauge options"),
        }
    }
}
