//! Telemetry set-up: the only place the tracing subscriber and OpenTelemetry are installed.
//!
//! - Logs: `tracing` events as JSON lines (or text) on stderr; an event inside a span carries the
//!   span's `trace_id` and `span_id`.
//! - Traces: every `tracing` span is an OpenTelemetry span. The [`sampler`] decides which traces
//!   are exported: parent-based, with a root rate that rises with the error rate and latency;
//!   a trace that records an error is kept whatever the rate ([`keep::ErrorKeeper`]).
//!   Exported over OTLP/gRPC when an endpoint is configured.
//! - Metrics: Prometheus text at `/metrics` always ([`crate::metrics`]); the same families are
//!   exported over OTLP when an endpoint is configured ([`otlp_metrics`]).
//! - Personal data: log fields holding identities, names, IPs or phone numbers go through
//!   [`mediamesh_actors::pii::Pii`].

mod keep;
mod leak;
mod logs;
pub mod otlp_metrics;
pub mod propagation;
pub mod sampler;

pub use leak::LeakDetector;
pub use sampler::RateController;

use crate::config::LogFormat;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// What [`init`] needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// Spans (and the trace ids in logs) on; off only for measuring their cost.
    pub traces: bool,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
    /// Lowest share of new traces exported when nothing goes wrong.
    pub sample_floor: f64,
    pub service_instance: String,
    pub region: String,
}

/// Handles to the installed telemetry, shared by the node's metrics and HTTP edge.
pub struct Telemetry {
    pub sampler: Arc<RateController>,
    /// Spans open now (the leak signal compares live tasks against it).
    pub active_spans: Arc<AtomicI64>,
    provider: Option<SdkTracerProvider>,
    otlp_endpoint: Option<String>,
}

impl Telemetry {
    /// The collector spans go to, if any.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }

    /// Exports what is buffered; called when the node stops.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

static INSTALLED: OnceLock<Arc<Telemetry>> = OnceLock::new();

/// Installs logging and tracing once per process and returns the handles; later calls (tests
/// running several nodes in one process) get the first installation. Call it inside a tokio
/// runtime: the OTLP exporter's channel lives on it.
pub fn init(config: &TelemetryConfig) -> Arc<Telemetry> {
    Arc::clone(INSTALLED.get_or_init(|| Arc::new(install(config))))
}

fn install(config: &TelemetryConfig) -> Telemetry {
    let sampler = Arc::new(RateController::new(config.sample_floor));
    let active_spans = Arc::new(AtomicI64::new(0));
    let filter = EnvFilter::new(log_filter(std::env::var("RUST_LOG").ok().as_deref()));
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(logs::JsonLines)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let mut provider = None;
    let mut exporter_error = None;
    let otel = config.traces.then(|| {
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(sampler::AdaptiveSampler::new(Arc::clone(&sampler)))
            .with_resource(resource(config));
        if let Some(endpoint) = &config.otlp_endpoint {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
            {
                Ok(exporter) => {
                    let batch = BatchSpanProcessor::builder(exporter).build();
                    builder = builder.with_span_processor(keep::ErrorKeeper::new(batch));
                }
                Err(error) => exporter_error = Some(error.to_string()),
            }
        }
        let built = builder.build();
        let tracer = built.tracer("mediamesh");
        provider = Some(built);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_error_events_to_status(true)
            .with_location(false)
            .with_threads(false)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(SpanCounter(Arc::clone(&active_spans)))
        .with(fmt)
        .try_init()
        .is_ok();
    if installed {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    }
    if let Some(error) = exporter_error {
        tracing::warn!(%error, "OTLP span exporter not started; spans are not exported");
    }
    Telemetry {
        sampler,
        active_spans,
        provider,
        otlp_endpoint: config.otlp_endpoint.clone(),
    }
}

/// `RUST_LOG` (default `info`), with the WebRTC crates capped at `warn` unless it names them:
/// at debug they log raw client addresses, which mediamesh's own logs never do.
fn log_filter(rust_log: Option<&str>) -> String {
    let mut filter = rust_log
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .unwrap_or("info")
        .to_string();
    for noisy in ["webrtc", "rtc"] {
        let named = filter.split(',').any(|directive| {
            directive
                .split(['=', ':', '['])
                .next()
                .is_some_and(|target| target.trim() == noisy)
        });
        if !named {
            filter.push_str(&format!(",{noisy}=warn"));
        }
    }
    filter
}

fn resource(config: &TelemetryConfig) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name("mediamesh")
        .with_attributes([
            KeyValue::new("service.instance.id", config.service_instance.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("cloud.region", config.region.clone()),
        ])
        .build()
}

/// Counts open spans: created minus closed.
struct SpanCounter(Arc<AtomicI64>);

impl<S: tracing::Subscriber> Layer<S> for SpanCounter {
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn on_close(&self, _id: tracing::span::Id, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn webrtc_crates_stay_at_warn_unless_named() {
        assert_eq!(log_filter(None), "info,webrtc=warn,rtc=warn");
        assert_eq!(log_filter(Some("debug")), "debug,webrtc=warn,rtc=warn");
        assert_eq!(log_filter(Some("info,rtc=debug")), "info,rtc=debug,webrtc=warn");
        assert_eq!(
            log_filter(Some("rtc_turn=debug")),
            "rtc_turn=debug,webrtc=warn,rtc=warn"
        );
    }
}
