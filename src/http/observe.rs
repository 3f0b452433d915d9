//! Middleware around every HTTP request: a server span that continues the caller's W3C trace
//! context, the request duration histogram by route pattern (never the raw path: room and
//! session names stay out of labels), and the sampler's error and latency feed.

use super::AppState;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use mediamesh_actors::pii::Pii;
use std::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Methods kept as label values; anything else is `other`.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

pub async fn observe(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = method_label(request.method());
    let client = request
        .peer_addr()
        .map(|a| Pii::Ip(a.ip()).to_string())
        .unwrap_or_default();
    // The route pattern comes from the app's resource map, before routing.
    let route = request.match_pattern().unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!(
        "http",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method,
        http.route = route.as_str(),
        http.response.status_code = Empty,
        client.address = %client,
    );
    // A missing or malformed traceparent leaves the span a root.
    let _ = span.set_parent(super::super::telemetry::propagation::extract_http(request.headers()));
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let result = next.call(request).instrument(span.clone()).await;
    let status = match &result {
        Ok(response) => response.status().as_u16(),
        Err(error) => error.as_response_error().status_code().as_u16(),
    };
    // OpenTelemetry wants integers; tracing-opentelemetry exports only i64 as one.
    span.record("http.response.status_code", i64::from(status));
    if status >= 400 {
        span.record("otel.status_code", "error");
        span.in_scope(|| tracing::info!(status, route = %route, client = %client, "request refused"));
    } else {
        span.in_scope(|| tracing::debug!(status, route = %route, client = %client, "request"));
    }
    if let Some(state) = state {
        state.metrics.observe_http(&route, method, status, started);
    }
    result
}
