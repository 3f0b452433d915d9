//! Pushes the node's Prometheus families to an OTLP/gRPC collector at a fixed interval, so the
//! two views can never disagree: counters become monotonic cumulative sums, gauges gauges, and
//! histograms cumulative explicit-bucket histograms.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default push interval; `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds) overrides it.
const INTERVAL_DEFAULT: Duration = Duration::from_secs(10);

pub fn interval() -> Duration {
    std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms >= 100)
        .map_or(INTERVAL_DEFAULT, Duration::from_millis)
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One export request for `families`, gathered at `now`, counted since `start`.
pub fn to_request(
    families: &[MetricFamily],
    resource: &[(&str, &str)],
    start: SystemTime,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let (start, now) = (unix_nanos(start), unix_nanos(now));
    let metrics = families
        .iter()
        .filter_map(|family| {
            let points = family.get_metric();
            let labels = |m: &prometheus::proto::Metric| -> Vec<KeyValue> {
                m.get_label().iter().map(|l| string(l.name(), l.value())).collect()
            };
            let number = |m: &prometheus::proto::Metric, value: f64| NumberDataPoint {
                attributes: labels(m),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            };
            let data = match family.get_field_type() {
                MetricType::COUNTER => metric::Data::Sum(Sum {
                    data_points: points.iter().map(|m| number(m, m.get_counter().get_value())).collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                MetricType::GAUGE => metric::Data::Gauge(Gauge {
                    data_points: points.iter().map(|m| number(m, m.get_gauge().get_value())).collect(),
                }),
                MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
                    data_points: points
                        .iter()
                        .map(|m| {
                            let h = m.get_histogram();
                            // Prometheus buckets are cumulative; OTLP wants a count per bucket
                            // plus the overflow bucket.
                            let mut previous = 0;
                            let mut bucket_counts: Vec<u64> = h
                                .get_bucket()
                                .iter()
                                .map(|b| {
                                    let count = b.cumulative_count().saturating_sub(previous);
                                    previous = b.cumulative_count();
                                    count
                                })
                                .collect();
                            bucket_counts.push(h.get_sample_count().saturating_sub(previous));
                            HistogramDataPoint {
                                attributes: labels(m),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: h.get_sample_count(),
                                sum: Some(h.get_sample_sum()),
                                bucket_counts,
                                explicit_bounds: h.get_bucket().iter().map(|b| b.upper_bound()).collect(),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
                _ => return None,
            };
            Some(Metric {
                name: family.name().to_string(),
                description: family.help().to_string(),
                data: Some(data),
                ..Default::default()
            })
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| string(k, v)).collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "mediamesh".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Pushes `gather()` to `endpoint` every [`interval`] until the task is dropped. Failures are
/// logged once per change of state, not per push.
pub async fn push_forever(
    endpoint: String,
    resource: Vec<(String, String)>,
    gather: impl Fn() -> Vec<MetricFamily> + Send + 'static,
) {
    let start = SystemTime::now();
    let mut ticker = tokio::time::interval(interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client = None;
    let mut failing = false;
    loop {
        ticker.tick().await;
        if client.is_none() {
            client = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .ok()
                .map(|e| MetricsServiceClient::new(e.timeout(Duration::from_secs(5)).connect_lazy()));
        }
        let Some(client) = client.as_mut() else {
            tracing::warn!("OTLP metrics endpoint is not a valid URL; metrics are not exported");
            return;
        };
        let resource: Vec<(&str, &str)> = resource.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let request = to_request(&gather(), &resource, start, SystemTime::now());
        match client.export(request).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("OTLP metrics export recovered");
            }
            Ok(_) => {}
            Err(status) if !failing => {
                failing = true;
                tracing::warn!(code = ?status.code(), "OTLP metrics export failed");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

    #[test]
    fn families_convert_to_otlp_with_per_bucket_counts() {
        let registry = Registry::new();
        let counter = IntCounterVec::new(Opts::new("x_total", "x"), &["code"]).expect("valid");
        registry.register(Box::new(counter.clone())).expect("registered");
        counter.with_label_values(&["a"]).inc_by(3);
        let histogram =
            Histogram::with_opts(HistogramOpts::new("y_seconds", "y").buckets(vec![0.1, 1.0])).expect("valid");
        registry.register(Box::new(histogram.clone())).expect("registered");
        for v in [0.05, 0.5, 0.7, 5.0] {
            histogram.observe(v);
        }
        let request = to_request(
            &registry.gather(),
            &[("service.name", "t")],
            UNIX_EPOCH,
            SystemTime::now(),
        );
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["x_total", "y_seconds"]);
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("counter is a sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points[0].value, Some(number_data_point::Value::AsDouble(3.0)));
        assert_eq!(sum.data_points[0].attributes[0].key, "code");
        let Some(metric::Data::Histogram(h)) = &metrics[1].data else {
            panic!("histogram")
        };
        assert_eq!(h.data_points[0].bucket_counts, vec![1, 2, 1]);
        assert_eq!(h.data_points[0].explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(h.data_points[0].count, 4);
    }
}
