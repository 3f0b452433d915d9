//! W3C trace context taken from requests: HTTP headers here, gRPC metadata in
//! [`mediamesh_cluster::trace_context`] (shared with the cluster's own calls).

use actix_web::http::header::HeaderMap;
use opentelemetry::propagation::Extractor;

pub use mediamesh_cluster::trace_context::extract as extract_grpc;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The caller's context from `traceparent`/`tracestate` headers (empty when absent or invalid).
pub fn extract_http(headers: &HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)))
}
