//! Node configuration: every setting comes from a flag, a `MEDIAMESH_<NAME>` environment
//! variable, or a TOML file given with `--config`, in that order of precedence, else a default.

use clap::Args;
use mediamesh_actors::turn::policy::{IpNet, PeerRule, PortRange};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

/// Flags of `mediamesh node` (and the secret-reading part of `mediamesh token`).
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "MEDIAMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id [default: hostname]
    #[arg(long, env = "MEDIAMESH_NODE_ID")]
    pub node_id: Option<String>,
    /// Region of this node (seoul, busan, ...) [default: seoul]
    #[arg(long, env = "MEDIAMESH_REGION")]
    pub region: Option<String>,
    /// Data directory [default: ./mediamesh-data]
    #[arg(long, env = "MEDIAMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP address: WHIP, WHEP, signaling, admin, metrics, dashboard [default: 0.0.0.0:8080]
    #[arg(long, env = "MEDIAMESH_HTTP")]
    pub http: Option<SocketAddr>,
    /// Public gRPC signaling address [default: 0.0.0.0:8081]
    #[arg(long, env = "MEDIAMESH_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// Internal cluster gRPC address [default: 0.0.0.0:7000]
    #[arg(long, env = "MEDIAMESH_CLUSTER")]
    pub cluster: Option<SocketAddr>,
    /// Address other nodes and clients use [default: first non-loopback IP, else 127.0.0.1]
    #[arg(long, env = "MEDIAMESH_ADVERTISE")]
    pub advertise: Option<IpAddr>,
    /// Join an existing cluster: host:port of its cluster addresses, comma separated
    #[arg(long, env = "MEDIAMESH_JOIN", value_delimiter = ',')]
    pub join: Option<Vec<String>>,
    /// Media UDP port range [default: 50000-50999]
    #[arg(long, env = "MEDIAMESH_MEDIA_PORTS")]
    pub media_ports: Option<String>,
    /// TURN UDP address, or `off` for no relay [default: 0.0.0.0:3478]
    #[arg(long, env = "MEDIAMESH_TURN")]
    pub turn: Option<String>,
    /// UDP port range of TURN relay sockets [default: 40000-49999]
    #[arg(long, env = "MEDIAMESH_TURN_RELAY_PORTS")]
    pub turn_relay_ports: Option<String>,
    /// Peers the relay may reach besides the mesh's media ports, comma separated:
    /// `CIDR`, `CIDR:PORT`, `CIDR:MIN-MAX`, `[IPv6-CIDR]:PORTS` [default: none]
    #[arg(long, env = "MEDIAMESH_TURN_ALLOW", value_delimiter = ',')]
    pub turn_allow: Option<Vec<String>>,
    /// Only relays whose address is inside these CIDRs are offered to clients, comma separated [default: any]
    #[arg(long, env = "MEDIAMESH_TURN_OFFER_RANGES", value_delimiter = ',')]
    pub turn_offer_ranges: Option<Vec<String>>,
    /// TURN allocations one identity holds at most on this relay [default: 10]
    #[arg(long, env = "MEDIAMESH_TURN_ALLOCATIONS_PER_IDENTITY_MAX")]
    pub turn_allocations_per_identity_max: Option<usize>,
    /// TURN allocations this relay holds at most [default: 1000]
    #[arg(long, env = "MEDIAMESH_TURN_ALLOCATIONS_MAX")]
    pub turn_allocations_max: Option<usize>,
    /// Bytes per second one allocation relays at most, both ways; 0 for no cap [default: 2500000]
    #[arg(long, env = "MEDIAMESH_TURN_ALLOCATION_BYTES_PER_SECOND_MAX")]
    pub turn_allocation_bytes_per_second_max: Option<u64>,
    /// The previous TURN secret stays valid this long after a rotation [default: 3600000]
    #[arg(long, env = "MEDIAMESH_TURN_SECRET_GRACE_MS")]
    pub turn_secret_grace_ms: Option<u64>,
    /// Lifetime of TURN credentials handed to clients [default: 86400000]
    #[arg(long, env = "MEDIAMESH_TURN_CREDENTIAL_TTL_MS")]
    pub turn_credential_ttl_ms: Option<u64>,
    /// TURN realm [default: mediamesh]
    #[arg(long, env = "MEDIAMESH_TURN_REALM")]
    pub turn_realm: Option<String>,
    /// Token signing secret [default: generated once into the data directory]
    #[arg(long, env = "MEDIAMESH_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Cluster secret; a joining node must be given the same one [default: generated once]
    #[arg(long, env = "MEDIAMESH_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Largest accepted HTTP request body in bytes [default: 65536]
    #[arg(long, env = "MEDIAMESH_BODY_BYTES_MAX")]
    pub body_bytes_max: Option<usize>,
    /// Rooms this node hosts at most [default: 1000]
    #[arg(long, env = "MEDIAMESH_ROOMS_PER_NODE_MAX")]
    pub rooms_per_node_max: Option<usize>,
    /// Sessions (WHIP/WHEP connections) this node holds at most [default: 900, under the port range]
    #[arg(long, env = "MEDIAMESH_SESSIONS_PER_NODE_MAX")]
    pub sessions_per_node_max: Option<usize>,
    /// Subscribers per room at most [default: 500]
    #[arg(long, env = "MEDIAMESH_SUBSCRIBERS_PER_ROOM_MAX")]
    pub subscribers_per_room_max: Option<usize>,
    /// Publishers per room at most [default: 16]
    #[arg(long, env = "MEDIAMESH_PUBLISHERS_PER_ROOM_MAX")]
    pub publishers_per_room_max: Option<usize>,
    /// Log format: json or text [default: json]
    #[arg(long, env = "MEDIAMESH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Viewer state expires this many milliseconds after its last update [default: 300000]
    #[arg(long, env = "MEDIAMESH_VIEWER_TTL_MS")]
    pub viewer_ttl_ms: Option<u64>,
    /// A dropped viewer may resume its session this many milliseconds after the drop [default: 30000]
    #[arg(long, env = "MEDIAMESH_RESUME_WINDOW_MS")]
    pub resume_window_ms: Option<u64>,
    /// A signal session that sends nothing for this many milliseconds is ended [default: 30000]
    #[arg(long, env = "MEDIAMESH_SIGNAL_IDLE_TIMEOUT_MS")]
    pub signal_idle_timeout_ms: Option<u64>,
    /// The node reports its load (and that it is alive) this often, in milliseconds [default: 500]
    #[arg(long, env = "MEDIAMESH_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// The leader declares a node dead, and re-places its rooms, after this many missed heartbeats [default: 3]
    #[arg(long, env = "MEDIAMESH_DEAD_AFTER_MISSED")]
    pub dead_after_missed: Option<u32>,
    /// A drain (admin call or SIGTERM) moves everything off the node within this many milliseconds [default: 30000]
    #[arg(long, env = "MEDIAMESH_DRAIN_DEADLINE_MS")]
    pub drain_deadline_ms: Option<u64>,
    /// New rooms avoid nodes above this CPU use, a fraction of their cores [default: 0.85]
    #[arg(long, env = "MEDIAMESH_PLACEMENT_CPU_MAX")]
    pub placement_cpu_max: Option<f32>,
    /// Tests only: serve `POST`/`DELETE /admin/v1/test/partition`, which cut this node's cluster
    /// traffic to other nodes. Never on a production node.
    #[arg(long, env = "MEDIAMESH_TEST_FAULTS", hide = true)]
    pub test_faults: bool,
    /// Tests only: the usage meter's clock runs this many milliseconds ahead of the wall clock
    /// (negative: behind), so a test can start a viewer just before a KST midnight.
    #[arg(
        long,
        env = "MEDIAMESH_TEST_CLOCK_OFFSET_MS",
        hide = true,
        allow_hyphen_values = true
    )]
    pub test_clock_offset_ms: Option<i64>,
    /// Benchmarks only: this many synthetic viewers write their state through the store's
    /// viewer batcher (see `synthetic.rs`); with the four flags below.
    #[arg(long, env = "MEDIAMESH_SYNTHETIC_VIEWERS", hide = true)]
    pub synthetic_viewers: Option<usize>,
    /// Benchmarks only: each synthetic viewer writes once per this many milliseconds.
    #[arg(long, hide = true, default_value_t = 2_000)]
    pub synthetic_report_ms: u64,
    /// Benchmarks only: synthetic writes are not measured for this long first.
    #[arg(long, hide = true, default_value_t = 5_000)]
    pub synthetic_warmup_ms: u64,
    /// Benchmarks only: synthetic writes are measured for this long, then stop.
    #[arg(long, hide = true, default_value_t = 60_000)]
    pub synthetic_duration_ms: u64,
    /// Benchmarks only: the synthetic viewers' JSON summary goes here (relative: in the data
    /// directory).
    #[arg(long, hide = true)]
    pub synthetic_out: Option<PathBuf>,
    /// Display names containing Hangul are kept, shown and logged only masked (김민수 → Kim*Su);
    /// `false` keeps them raw in the store, the admin API and the dashboard (logs stay masked) [default: true]
    #[arg(long, env = "MEDIAMESH_MASK_NAMES")]
    pub mask_names: Option<bool>,
    /// Viewer time is added to the replicated usage ledger this often, in milliseconds [default: 10000]
    #[arg(long, env = "MEDIAMESH_USAGE_FLUSH_MS")]
    pub usage_flush_ms: Option<u64>,
    /// Signal sessions (WebSocket and gRPC) this node holds at most [default: 2 × sessions per node]
    #[arg(long, env = "MEDIAMESH_SIGNAL_SESSIONS_MAX")]
    pub signal_sessions_max: Option<usize>,
    /// OTLP/gRPC collector for traces and metrics, e.g. http://127.0.0.1:4317 [default: none;
    /// also read from OTEL_EXPORTER_OTLP_ENDPOINT]
    #[arg(long, env = "MEDIAMESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Lowest share of new traces exported while requests succeed, 0 to 1 [default: 0.05]
    #[arg(long, env = "MEDIAMESH_TRACE_SAMPLE_FLOOR")]
    pub trace_sample_floor: Option<f64>,
    /// Tracing spans (and trace ids in logs): on or off; off only to measure their cost [default: on]
    #[arg(long, env = "MEDIAMESH_TRACES")]
    pub traces: Option<String>,
}

/// The same settings as read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    region: Option<String>,
    data_dir: Option<PathBuf>,
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    cluster: Option<SocketAddr>,
    advertise: Option<IpAddr>,
    join: Option<Vec<String>>,
    media_ports: Option<String>,
    turn: Option<String>,
    turn_relay_ports: Option<String>,
    turn_allow: Option<Vec<String>>,
    turn_offer_ranges: Option<Vec<String>>,
    turn_allocations_per_identity_max: Option<usize>,
    turn_allocations_max: Option<usize>,
    turn_allocation_bytes_per_second_max: Option<u64>,
    turn_secret_grace_ms: Option<u64>,
    turn_credential_ttl_ms: Option<u64>,
    turn_realm: Option<String>,
    api_secret: Option<String>,
    cluster_secret: Option<String>,
    body_bytes_max: Option<usize>,
    rooms_per_node_max: Option<usize>,
    sessions_per_node_max: Option<usize>,
    subscribers_per_room_max: Option<usize>,
    publishers_per_room_max: Option<usize>,
    log_format: Option<String>,
    viewer_ttl_ms: Option<u64>,
    resume_window_ms: Option<u64>,
    signal_idle_timeout_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    dead_after_missed: Option<u32>,
    drain_deadline_ms: Option<u64>,
    placement_cpu_max: Option<f32>,
    mask_names: Option<bool>,
    usage_flush_ms: Option<u64>,
    signal_sessions_max: Option<usize>,
    otlp_endpoint: Option<String>,
    trace_sample_floor: Option<f64>,
    traces: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The resolved configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub region: String,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub cluster: SocketAddr,
    pub advertise: IpAddr,
    pub join: Vec<String>,
    pub media_port_min: u16,
    pub media_port_max: u16,
    /// The TURN relay (None: `--turn off`).
    pub turn: Option<TurnSettings>,
    pub api_secret: String,
    pub cluster_secret: String,
    pub body_bytes_max: usize,
    pub rooms_per_node_max: usize,
    pub sessions_per_node_max: usize,
    pub subscribers_per_room_max: usize,
    pub publishers_per_room_max: usize,
    pub log_format: LogFormat,
    pub viewer_ttl_ms: u64,
    pub resume_window_ms: u64,
    pub signal_idle_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub dead_after_missed: u32,
    pub drain_deadline_ms: u64,
    pub placement_cpu_max: f32,
    pub test_faults: bool,
    pub test_clock_offset_ms: i64,
    pub mask_names: bool,
    pub usage_flush_ms: u64,
    pub signal_sessions_max: usize,
    pub otlp_endpoint: Option<String>,
    pub trace_sample_floor: f64,
    pub traces: bool,
    /// Benchmarks only: synthetic viewers (`--synthetic-viewers`).
    pub synthetic: Option<crate::synthetic::SyntheticConfig>,
}

impl NodeConfig {
    /// What the telemetry set-up needs.
    pub fn telemetry(&self) -> crate::telemetry::TelemetryConfig {
        crate::telemetry::TelemetryConfig {
            log_format: self.log_format,
            traces: self.traces,
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_floor: self.trace_sample_floor,
            service_instance: self.node_id.clone(),
            region: self.region.clone(),
        }
    }
}

/// Settings of the embedded TURN relay.
#[derive(Debug, Clone)]
pub struct TurnSettings {
    pub listen: SocketAddr,
    pub relay_ports: PortRange,
    pub allow: Vec<PeerRule>,
    pub offer_ranges: Vec<IpNet>,
    pub allocations_per_identity_max: usize,
    pub allocations_max: usize,
    pub allocation_bytes_per_second_max: u64,
    pub secret_grace_ms: u64,
    pub credential_ttl_ms: u64,
    pub realm: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {name}: {message}")]
    Invalid { name: &'static str, message: String },
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
}

pub const BODY_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// `--heartbeat-interval-ms` when not set.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 500;
const SECRET_BYTES: usize = 32;

impl NodeArgs {
    /// Flags and environment (already merged by clap) over the TOML file, over defaults.
    pub fn resolve(&self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./mediamesh-data"));
        std::fs::create_dir_all(&data_dir).map_err(|source| ConfigError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let media_ports = self
            .media_ports
            .clone()
            .or(file.media_ports.clone())
            .unwrap_or_else(|| "50000-50999".into());
        let (media_port_min, media_port_max) = parse_port_range(&media_ports)?;
        let turn = self.resolve_turn(&file, (media_port_min, media_port_max))?;
        let log_format = match self.log_format.clone().or(file.log_format).as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "log_format",
                    message: format!("{other:?} is neither json nor text"),
                });
            }
        };
        let traces = match self.traces.clone().or(file.traces).as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "traces",
                    message: format!("{other:?} is neither on nor off"),
                });
            }
        };
        let trace_sample_floor = self.trace_sample_floor.or(file.trace_sample_floor).unwrap_or(0.05);
        if !(0.0..=1.0).contains(&trace_sample_floor) {
            return Err(ConfigError::Invalid {
                name: "trace_sample_floor",
                message: format!("{trace_sample_floor} is not between 0 and 1"),
            });
        }
        let otlp_endpoint = self
            .otlp_endpoint
            .clone()
            .or(file.otlp_endpoint)
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty());
        if let Some(endpoint) = &otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                name: "otlp_endpoint",
                message: format!("{endpoint:?} is not an http:// or https:// URL"),
            });
        }
        let api_secret = match self.api_secret.clone().or(file.api_secret) {
            Some(secret) => secret,
            None => secret_in_data_dir(&data_dir, "api-secret")?,
        };
        let cluster_secret = match self.cluster_secret.clone().or(file.cluster_secret) {
            Some(secret) => secret,
            None => secret_in_data_dir(&data_dir, "cluster-secret")?,
        };
        for (name, secret) in [("api_secret", &api_secret), ("cluster_secret", &cluster_secret)] {
            if secret.len() < 16 {
                return Err(ConfigError::Invalid {
                    name,
                    message: "a secret needs at least 16 characters".into(),
                });
            }
        }
        let sessions_per_node_max = self
            .sessions_per_node_max
            .or(file.sessions_per_node_max)
            .unwrap_or(900)
            .min(usize::from(media_port_max - media_port_min) + 1);
        let positive = |name: &'static str, value: usize| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    name,
                    message: "must be at least 1".into(),
                })
            } else {
                Ok(value)
            }
        };
        Ok(NodeConfig {
            node_id: self.node_id.clone().or(file.node_id).unwrap_or_else(hostname),
            region: self.region.clone().or(file.region).unwrap_or_else(|| "seoul".into()),
            http: self
                .http
                .or(file.http)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            grpc: self
                .grpc
                .or(file.grpc)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8081))),
            cluster: self
                .cluster
                .or(file.cluster)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 7000))),
            advertise: self.advertise.or(file.advertise).unwrap_or_else(default_advertise),
            join: self.join.clone().or(file.join).unwrap_or_default(),
            media_port_min,
            media_port_max,
            turn,
            api_secret,
            cluster_secret,
            body_bytes_max: positive(
                "body_bytes_max",
                self.body_bytes_max
                    .or(file.body_bytes_max)
                    .unwrap_or(BODY_BYTES_MAX_DEFAULT),
            )?,
            rooms_per_node_max: positive(
                "rooms_per_node_max",
                self.rooms_per_node_max.or(file.rooms_per_node_max).unwrap_or(1_000),
            )?,
            sessions_per_node_max: positive("sessions_per_node_max", sessions_per_node_max)?,
            subscribers_per_room_max: positive(
                "subscribers_per_room_max",
                self.subscribers_per_room_max
                    .or(file.subscribers_per_room_max)
                    .unwrap_or(500),
            )?,
            publishers_per_room_max: positive(
                "publishers_per_room_max",
                self.publishers_per_room_max
                    .or(file.publishers_per_room_max)
                    .unwrap_or(16),
            )?,
            log_format,
            viewer_ttl_ms: positive(
                "viewer_ttl_ms",
                self.viewer_ttl_ms.or(file.viewer_ttl_ms).unwrap_or(300_000) as usize,
            )? as u64,
            resume_window_ms: positive(
                "resume_window_ms",
                self.resume_window_ms.or(file.resume_window_ms).unwrap_or(30_000) as usize,
            )? as u64,
            signal_idle_timeout_ms: positive(
                "signal_idle_timeout_ms",
                self.signal_idle_timeout_ms
                    .or(file.signal_idle_timeout_ms)
                    .unwrap_or(30_000) as usize,
            )? as u64,
            heartbeat_interval_ms: positive(
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms
                    .or(file.heartbeat_interval_ms)
                    .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS) as usize,
            )? as u64,
            dead_after_missed: positive(
                "dead_after_missed",
                self.dead_after_missed.or(file.dead_after_missed).unwrap_or(3) as usize,
            )? as u32,
            drain_deadline_ms: positive(
                "drain_deadline_ms",
                self.drain_deadline_ms.or(file.drain_deadline_ms).unwrap_or(30_000) as usize,
            )? as u64,
            placement_cpu_max: {
                let cpu = self.placement_cpu_max.or(file.placement_cpu_max).unwrap_or(0.85);
                if !(cpu > 0.0 && cpu <= 1.0) {
                    return Err(ConfigError::Invalid {
                        name: "placement_cpu_max",
                        message: format!("must be in (0, 1], not {cpu}"),
                    });
                }
                cpu
            },
            test_faults: self.test_faults,
            test_clock_offset_ms: self.test_clock_offset_ms.unwrap_or(0),
            mask_names: self.mask_names.or(file.mask_names).unwrap_or(true),
            usage_flush_ms: positive(
                "usage_flush_ms",
                self.usage_flush_ms.or(file.usage_flush_ms).unwrap_or(10_000) as usize,
            )? as u64,
            signal_sessions_max: positive(
                "signal_sessions_max",
                self.signal_sessions_max
                    .or(file.signal_sessions_max)
                    .unwrap_or(sessions_per_node_max.saturating_mul(2)),
            )?,
            otlp_endpoint,
            trace_sample_floor,
            traces,
            synthetic: match (self.synthetic_viewers, &self.synthetic_out) {
                (None | Some(0), _) => None,
                (Some(_), None) => {
                    return Err(ConfigError::Invalid {
                        name: "synthetic_viewers",
                        message: "needs --synthetic-out".into(),
                    });
                }
                (Some(viewers), Some(out)) => Some(crate::synthetic::SyntheticConfig {
                    viewers,
                    report_ms: self.synthetic_report_ms.max(1),
                    warmup_ms: self.synthetic_warmup_ms,
                    duration_ms: self.synthetic_duration_ms,
                    // A relative path is inside the data directory (one flag for every node).
                    out: if out.is_relative() {
                        data_dir.join(out)
                    } else {
                        out.clone()
                    },
                }),
            },
            data_dir,
        })
    }
}

impl NodeArgs {
    /// `media` is the media port range: relay sockets must never take one of its ports. A default
    /// relay range gives way to it; an explicit one that overlaps it is refused.
    fn resolve_turn(&self, file: &FileConfig, media: (u16, u16)) -> Result<Option<TurnSettings>, ConfigError> {
        let invalid = |name: &'static str| move |message: String| ConfigError::Invalid { name, message };
        let listen = match self.turn.clone().or(file.turn.clone()).as_deref() {
            Some("off") => return Ok(None),
            None => SocketAddr::from(([0, 0, 0, 0], 3478)),
            Some(text) => text
                .parse()
                .map_err(|_| invalid("turn")(format!("{text:?} is neither host:port nor off")))?,
        };
        let overlaps = |r: PortRange| r.min <= media.1 && media.0 <= r.max;
        let relay_ports = match self.turn_relay_ports.clone().or(file.turn_relay_ports.clone()) {
            Some(text) => {
                let ports: PortRange = text.parse().map_err(invalid("turn_relay_ports"))?;
                if overlaps(ports) {
                    return Err(invalid("turn_relay_ports")(format!(
                        "{text} overlaps the media ports {}-{}",
                        media.0, media.1
                    )));
                }
                ports
            }
            None => {
                let default = PortRange {
                    min: 40_000,
                    max: 49_999,
                };
                let below = PortRange {
                    min: default.min,
                    max: media.0.saturating_sub(1),
                };
                let above = PortRange {
                    min: media.1.saturating_add(1),
                    max: default.max,
                };
                // The part below the media ports when there is one, else the part above.
                match (overlaps(default), below.min <= below.max, above.min <= above.max) {
                    (false, _, _) => default,
                    (true, true, _) => below,
                    (true, _, true) => above,
                    (true, false, false) => {
                        return Err(invalid("turn_relay_ports")(
                            "the media ports cover the default relay range 40000-49999: set --turn-relay-ports".into(),
                        ));
                    }
                }
            }
        };
        // Comma-separated items, blanks skipped.
        fn parse_list<T: std::str::FromStr<Err = String>>(items: Option<&Vec<String>>) -> Result<Vec<T>, String> {
            items
                .into_iter()
                .flatten()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(str::parse)
                .collect()
        }
        let allow: Vec<PeerRule> =
            parse_list(self.turn_allow.as_ref().or(file.turn_allow.as_ref())).map_err(invalid("turn_allow"))?;
        let offer_ranges: Vec<IpNet> = parse_list(self.turn_offer_ranges.as_ref().or(file.turn_offer_ranges.as_ref()))
            .map_err(invalid("turn_offer_ranges"))?;
        let realm = self
            .turn_realm
            .clone()
            .or(file.turn_realm.clone())
            .unwrap_or_else(|| "mediamesh".into());
        if realm.is_empty() || realm.len() > 127 {
            return Err(invalid("turn_realm")("1 to 127 characters".into()));
        }
        Ok(Some(TurnSettings {
            listen,
            relay_ports,
            allow,
            offer_ranges,
            allocations_per_identity_max: self
                .turn_allocations_per_identity_max
                .or(file.turn_allocations_per_identity_max)
                .unwrap_or(10),
            allocations_max: self.turn_allocations_max.or(file.turn_allocations_max).unwrap_or(1000),
            allocation_bytes_per_second_max: self
                .turn_allocation_bytes_per_second_max
                .or(file.turn_allocation_bytes_per_second_max)
                .unwrap_or(2_500_000),
            secret_grace_ms: self
                .turn_secret_grace_ms
                .or(file.turn_secret_grace_ms)
                .unwrap_or(3_600_000),
            credential_ttl_ms: self
                .turn_credential_ttl_ms
                .or(file.turn_credential_ttl_ms)
                .unwrap_or(86_400_000)
                .max(1000),
            realm,
        }))
    }
}

pub fn parse_port_range(text: &str) -> Result<(u16, u16), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        name: "media_ports",
        message,
    };
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| invalid(format!("{text:?} is not a range like 50000-50999")))?;
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| invalid(format!("{low:?} is not a port")))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| invalid(format!("{high:?} is not a port")))?;
    if low == 0 || low > high {
        return Err(invalid(format!("{low}-{high} is empty or starts at 0")));
    }
    Ok((low, high))
}

/// Reads a secret from the data directory, generating it (mode 0600) on first use.
pub fn secret_in_data_dir(data_dir: &Path, name: &str) -> Result<String, ConfigError> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::DataDir { path, source }),
    }
    let secret = generate_secret();
    write_private(&path, &secret).map_err(|source| ConfigError::DataDir { path, source })?;
    Ok(secret)
}

/// A fresh random secret of [`SECRET_BYTES`] bytes, in hex (the API, cluster and TURN secrets).
pub fn generate_secret() -> String {
    let bytes: [u8; SECRET_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mediamesh".into())
}

/// The first non-loopback address: the one the kernel would route outward from (no packet is
/// sent by connecting a UDP socket), else loopback.
fn default_advertise() -> IpAddr {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("192.0.2.1:9")?; // TEST-NET-1: only consults the routing table
            socket.local_addr()
        })
        .map(|addr| addr.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_file_over_default() {
        let dir = std::env::temp_dir().join(format!("mm-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("node.toml");
        std::fs::write(
            &file,
            "region = \"busan\"\nnode_id = \"from-file\"\nmedia_ports = \"40000-40009\"\n",
        )
        .expect("write config");
        let args = NodeArgs {
            config: Some(file),
            node_id: Some("from-flag".into()),
            data_dir: Some(dir.join("data")),
            ..Default::default()
        };
        let config = args.resolve().expect("valid");
        assert_eq!(config.node_id, "from-flag");
        assert_eq!(config.region, "busan");
        assert_eq!((config.media_port_min, config.media_port_max), (40000, 40009));
        // The default relay range gives way to the media ports.
        let relay = config.turn.as_ref().expect("TURN on by default").relay_ports;
        assert_eq!((relay.min, relay.max), (40010, 49999));
        assert_eq!(config.sessions_per_node_max, 10, "capped by the port range");
        assert_eq!(config.http.port(), 8080);
        // The generated secret is stable across reads.
        let again = args.resolve().expect("valid");
        assert_eq!(config.api_secret, again.api_secret);
        assert_eq!(config.api_secret.len(), 64);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(parse_port_range("5-1").is_err());
        assert!(parse_port_range("x").is_err());
        let dir = std::env::temp_dir().join(format!("mm-config-{}", uuid::Uuid::now_v7()));
        let file = dir.join("bad.toml");
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(&file, "no_such_setting = 1\n").expect("write");
        let args = NodeArgs {
            config: Some(file),
            data_dir: Some(dir.join("data")),
            ..Default::default()
        };
        let error = args.resolve().expect_err("unknown key");
        assert!(error.to_string().contains("no_such_setting"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
