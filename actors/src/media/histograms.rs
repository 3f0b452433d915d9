//! Latency histograms of the media plane. Created per node with its [`super::track::MediaCounters`]
//! and registered by the node's metrics; observing one is a few atomic adds.

use prometheus::{Histogram, HistogramOpts};

/// Round-trip bounds: loopback to intercontinental.
const RTT_BUCKETS: [f64; 11] = [0.001, 0.002_5, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];
/// First-frame bounds: a cached keyframe after ICE and DTLS, up to waiting for the next keyframe.
const FIRST_FRAME_BUCKETS: [f64; 11] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0];

#[derive(Debug, Clone)]
pub struct MediaHistograms {
    /// Subscriber round-trip times, from receiver reports on our sender reports.
    pub rtt_seconds: Histogram,
    /// From a viewer's offer to the first video keyframe written to it.
    pub first_frame_seconds: Histogram,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    // Names and bucket lists are static and valid.
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("static histogram options")
}

impl Default for MediaHistograms {
    fn default() -> Self {
        Self {
            rtt_seconds: histogram(
                "mediamesh_subscriber_rtt_seconds",
                "Round-trip time to subscribers, from their receiver reports",
                &RTT_BUCKETS,
            ),
            first_frame_seconds: histogram(
                "mediamesh_first_frame_seconds",
                "Time from a viewer's offer to the first video keyframe forwarded to it",
                &FIRST_FRAME_BUCKETS,
            ),
        }
    }
}
