//! Prometheus metrics of a node. Gauges and counters that mirror the actors' atomics are set at
//! scrape time, so the per-packet path only touches atomics. Labels are low-cardinality: never a
//! room, viewer or session id.

use crate::signal::{ErrorCode, ResumeOutcome, SignalStats};
use crate::telemetry::{LeakDetector, Telemetry};
use mediamesh_actors::media::track::MediaCounters;
use mediamesh_actors::registry::NodeStats;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Bounds of the HTTP request duration histogram, in seconds.
const HTTP_BUCKETS: [f64; 12] = [0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Bounds of the migration duration histogram, in seconds.
/// Where the node's metrics come from.
pub struct MetricSources {
    pub stats: Arc<NodeStats>,
    pub counters: Arc<MediaCounters>,
    pub ports: Arc<mediamesh_actors::media::engine::PortPool>,
    pub signal: Arc<SignalStats>,
    pub store: mediamesh_cluster::metrics::StoreMetrics,
    pub telemetry: Arc<Telemetry>,
    /// The node's tokio runtimes, whose live tasks are counted.
    pub runtimes: Vec<tokio::runtime::Handle>,
    /// The TURN relay's counters (None: `--turn off`).
    pub turn: Option<Arc<mediamesh_actors::turn::TurnStats>>,
    /// The mesh's relay, migration and failover counters.
    pub relay: Arc<crate::mesh::RelayStats>,
    /// The usage meter.
    pub usage: Arc<crate::usage::UsageMeter>,
}

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
    viewer_resumes: IntCounterVec,
    http_duration: HistogramVec,
    tokio_tasks: IntGauge,
    active_spans: IntGauge,
    leak_excess: IntGauge,
    sample_ratio: Gauge,
    leak: LeakDetector,
    telemetry: Arc<Telemetry>,
    runtimes: Vec<tokio::runtime::Handle>,
    turn: Option<crate::turn::TurnMetrics>,
    mesh: crate::mesh::MeshMetrics,
    usage: crate::usage::UsageMetrics,
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
    pub fn new(sources: MetricSources) -> Self {
        let MetricSources {
            stats,
            counters,
            ports,
            signal,
            store,
            telemetry,
            runtimes,
            turn,
            relay,
            usage,
        } = sources;
        let registry = Registry::new();
        register(&registry, Ok(counters.histograms.rtt_seconds.clone()));
        register(&registry, Ok(counters.histograms.first_frame_seconds.clone()));
        register(&registry, Ok(store.commit_seconds));
        register(&registry, Ok(store.leader_changes));
        register(&registry, Ok(store.is_leader));
        let viewer_resumes = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "mediamesh_viewer_resumes_total",
                    "Joins that carried a resume token, by outcome",
                ),
                &["outcome"],
            ),
        );
        let http_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mediamesh_http_request_duration_seconds",
                    "HTTP request duration by route pattern, method and status",
                )
                .buckets(HTTP_BUCKETS.to_vec()),
                &["route", "method", "status"],
            ),
        );
        let sample_ratio = register(
            &registry,
            Gauge::new(
                "mediamesh_trace_sample_ratio",
                "Share of new traces exported now (adaptive, between the floor and 1)",
            ),
        );
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
            viewer_resumes,
            http_duration,
            tokio_tasks: gauge(
                &registry,
                "mediamesh_tokio_alive_tasks",
                "Live tokio tasks on the node's runtimes",
            ),
            active_spans: gauge(&registry, "mediamesh_active_spans", "Tracing spans open now"),
            leak_excess: gauge(
                &registry,
                "mediamesh_task_leak_excess",
                "Live tokio tasks above the fewest seen at the same number of open spans (grows with a leak)",
            ),
            sample_ratio,
            leak: LeakDetector::default(),
            telemetry,
            runtimes,
            turn: turn.map(|stats| crate::turn::TurnMetrics::new(&registry, stats)),
            mesh: crate::mesh::MeshMetrics::new(&registry, relay),
            usage: crate::usage::UsageMetrics::new(&registry, usage),
            registry,
            stats,
            counters,
            ports,
        }
    }

    pub(crate) fn sync_counter(counter: &IntCounter, value: u64) {
        let current = counter.get();
        if value > current {
            counter.inc_by(value - current);
        }
    }

    /// One finished HTTP request: its duration by route, method and status, and (for traffic,
    /// not probes) the sampler's view of the error rate and latency.
    pub fn observe_http(&self, route: &str, method: &str, status: u16, started: Instant) {
        let elapsed = started.elapsed();
        self.http_duration
            .with_label_values(&[route, method, &status.to_string()])
            .observe(elapsed.as_secs_f64());
        // Probes and scrapes are not traffic: a node that is still starting answers /readyz with
        // 503 and must not look like a node in trouble.
        if !matches!(route, "/healthz" | "/readyz" | "/metrics") {
            self.telemetry.sampler.observe(Instant::now(), status >= 400, elapsed);
        }
    }

    /// The text exposition, with every mirrored value refreshed.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for families the registry produced.
        TextEncoder::new()
            .encode(&self.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).unwrap_or_default()
    }

    /// Every family, with mirrored values refreshed (for the exposition and OTLP).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
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
        let resumed = &signal.resume_outcomes[ResumeOutcome::Resumed as usize];
        Self::sync_counter(&self.signal_resumes, resumed.load(Ordering::Relaxed));
        for (code, count) in ErrorCode::ALL.iter().zip(&signal.errors) {
            Self::sync_counter(
                &self.signal_errors.with_label_values(&[code.as_str()]),
                count.load(Ordering::Relaxed),
            );
        }
        if let Some(turn) = &self.turn {
            turn.sync();
        }
        self.mesh.sync();
        self.usage.sync();
        self.resident_memory.set(process_resident_bytes() as i64);
        let cpu = process_cpu_seconds();
        let counted = self.cpu_seconds.get();
        if cpu > counted {
            self.cpu_seconds.inc_by(cpu - counted);
        }
        for (outcome, count) in ResumeOutcome::ALL.iter().zip(&signal.resume_outcomes) {
            Self::sync_counter(
                &self.viewer_resumes.with_label_values(&[outcome.as_str()]),
                count.load(Ordering::Relaxed),
            );
        }
        let tasks: usize = self.runtimes.iter().map(|r| r.metrics().num_alive_tasks()).sum();
        let tasks = i64::try_from(tasks).unwrap_or(i64::MAX);
        let spans = self.telemetry.active_spans.load(Ordering::Relaxed);
        self.tokio_tasks.set(tasks);
        self.active_spans.set(spans);
        self.leak_excess.set(self.leak.observe(spans, tasks));
        self.telemetry.sampler.tick(Instant::now());
        self.sample_ratio.set(self.telemetry.sampler.rate());
        self.registry.gather()
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
