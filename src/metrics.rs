//! Prometheus metrics of a node. Gauges and counters that mirror the actors' atomics are set at
//! scrape time, so the per-packet path only touches atomics. Labels are low-cardinality: never a
//! room, viewer or session id.

use crate::signal::{ErrorCode, SignalStats};
use mediamesh_actors::media::track::MediaCounters;
use mediamesh_actors::registry::NodeStats;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub struct Metrics {
    registry: Registry,
    stats: Arc<NodeStats>,
    counters: Arc<MediaCounters>,
    rooms: IntGauge,
    participants: IntGaugeVec,
    active_connections: IntGauge,
    sessions_refused: IntCounter,
    packets_in: IntCounter,
    bytes_in: IntCounter,
    packets_forwarded: IntCounter,
    bytes_forwarded: IntCounter,
    packets_dropped: IntCounter,
    packets_lost: IntCounter,
    keyframe_requests: IntCounter,
    media_ports_in_use: IntGauge,
    resident_memory: IntGauge,
    cpu_seconds: prometheus::Counter,
    ports: Arc<mediamesh_actors::media::engine::PortPool>,
    signal: Arc<SignalStats>,
    signal_sessions: IntGaugeVec,
    signal_resumes: IntCounter,
    signal_errors: IntCounterVec,
    turn: Option<crate::turn::TurnMetrics>,
}

/// Registers a metric built from static names; both steps fail only on a programming error.
pub(crate) fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> M {
    let metric = metric.expect("metric names are static and valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

pub(crate) fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help))
}

pub(crate) fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help))
}

impl Metrics {
    pub fn new(
        stats: Arc<NodeStats>,
        counters: Arc<MediaCounters>,
        ports: Arc<mediamesh_actors::media::engine::PortPool>,
        signal: Arc<SignalStats>,
    ) -> Self {
        let registry = Registry::new();
        let signal_sessions = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("mediamesh_signal_sessions", "Open signal sessions by transport"),
                &["transport"],
            ),
        );
        let signal_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "mediamesh_signal_errors_total",
                    "Error replies sent on signal sessions, by code",
                ),
                &["code"],
            ),
        );
        let participants = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("mediamesh_participants", "Sessions on this node by role"),
                &["role"],
            ),
        );
        let cpu_seconds = register(
            &registry,
            prometheus::Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds",
            ),
        );
        Self {
            rooms: gauge(&registry, "mediamesh_rooms", "Rooms hosted by this node"),
            participants,
            active_connections: gauge(
                &registry,
                "mediamesh_webrtc_active_connections",
                "Peer connections in the connected state (the scaling signal)",
            ),
            sessions_refused: counter(
                &registry,
                "mediamesh_sessions_refused_total",
                "Sessions refused by the per-node limit",
            ),
            packets_in: counter(
                &registry,
                "mediamesh_rtp_packets_received_total",
                "RTP packets received from publishers",
            ),
            bytes_in: counter(
                &registry,
                "mediamesh_rtp_received_bytes_total",
                "RTP payload bytes received from publishers",
            ),
            packets_forwarded: counter(
                &registry,
                "mediamesh_rtp_packets_forwarded_total",
                "RTP packets forwarded to subscribers",
            ),
            bytes_forwarded: counter(
                &registry,
                "mediamesh_rtp_forwarded_bytes_total",
                "RTP payload bytes forwarded to subscribers",
            ),
            packets_dropped: counter(
                &registry,
                "mediamesh_rtp_packets_dropped_total",
                "RTP packets dropped because a subscriber queue was full",
            ),
            packets_lost: counter(
                &registry,
                "mediamesh_rtp_packets_lost_total",
                "RTP packets missing from publishers' streams (sequence gaps at ingress)",
            ),
            keyframe_requests: counter(
                &registry,
                "mediamesh_keyframe_requests_total",
                "Keyframe requests sent to publishers",
            ),
            media_ports_in_use: gauge(
                &registry,
                "mediamesh_media_ports_in_use",
                "Media UDP ports leased by connections",
            ),
            resident_memory: gauge(
                &registry,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            cpu_seconds,
            signal_resumes: counter(
                &registry,
                "mediamesh_signal_resumes_total",
                "Viewer sessions given back by a resume token",
            ),
            signal,
            signal_sessions,
            signal_errors,
            turn: None,
            registry,
            stats,
            counters,
            ports,
        }
    }

    /// Adds the TURN relay's metrics (`mediamesh_turn_*`).
    pub fn with_turn(mut self, stats: Arc<mediamesh_actors::turn::TurnStats>) -> Self {
        self.turn = Some(crate::turn::TurnMetrics::new(&self.registry, stats));
        self
    }

    pub(crate) fn sync_counter(counter: &IntCounter, value: u64) {
        let current = counter.get();
        if value > current {
            counter.inc_by(value - current);
        }
    }

    /// The text exposition, with every mirrored value refreshed.
    pub fn render(&self) -> String {
        let stats = &self.stats;
        self.rooms.set(stats.rooms.load(Ordering::Relaxed));
        self.participants
            .with_label_values(&["publisher"])
            .set(stats.publishers.load(Ordering::Relaxed));
        self.participants
            .with_label_values(&["subscriber"])
            .set(stats.subscribers.load(Ordering::Relaxed));
        self.active_connections
            .set(stats.active_connections.load(Ordering::Relaxed));
        Self::sync_counter(
            &self.sessions_refused,
            stats.sessions_refused.load(Ordering::Relaxed) as u64,
        );
        let c = &self.counters;
        Self::sync_counter(&self.packets_in, c.packets_in.load(Ordering::Relaxed));
        Self::sync_counter(&self.bytes_in, c.bytes_in.load(Ordering::Relaxed));
        Self::sync_counter(&self.packets_forwarded, c.packets_forwarded.load(Ordering::Relaxed));
        Self::sync_counter(&self.bytes_forwarded, c.bytes_forwarded.load(Ordering::Relaxed));
        Self::sync_counter(&self.packets_dropped, c.packets_dropped.load(Ordering::Relaxed));
        Self::sync_counter(&self.packets_lost, c.packets_lost.load(Ordering::Relaxed));
        Self::sync_counter(&self.keyframe_requests, c.keyframe_requests.load(Ordering::Relaxed));
        self.media_ports_in_use.set(self.ports.in_use() as i64);
        let signal = &self.signal;
        self.signal_sessions
            .with_label_values(&["websocket"])
            .set(signal.websocket_sessions.load(Ordering::Relaxed));
        self.signal_sessions
            .with_label_values(&["grpc"])
            .set(signal.grpc_sessions.load(Ordering::Relaxed));
        Self::sync_counter(&self.signal_resumes, signal.resumes.load(Ordering::Relaxed));
        for (code, count) in ErrorCode::ALL.iter().zip(&signal.errors) {
            Self::sync_counter(
                &self.signal_errors.with_label_values(&[code.as_str()]),
                count.load(Ordering::Relaxed),
            );
        }
        if let Some(turn) = &self.turn {
            turn.sync();
        }
        self.resident_memory.set(process_resident_bytes() as i64);
        let cpu = process_cpu_seconds();
        let counted = self.cpu_seconds.get();
        if cpu > counted {
            self.cpu_seconds.inc_by(cpu - counted);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for families the registry produced.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Resident set size from /proc/self/statm.
pub fn process_resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// User plus system CPU time of this process, from getrusage.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
