//! Keeps traces that contain an error although the sampler did not choose them: their recorded
//! spans are held until the trace's local root ends, and passed on (marked sampled) as soon as
//! one of them ends with an error status.

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Traces held at once; beyond it the oldest are dropped.
const TRACES_HELD_MAX: usize = 4_096;
/// Spans held per trace; later ones of a huge trace are dropped.
const SPANS_PER_TRACE_MAX: usize = 256;
/// A held trace whose root never ends (or ended elsewhere) is dropped after this.
const HOLD_MAX: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Held {
    since: Instant,
    spans: Vec<SpanData>,
    failed: bool,
}

#[derive(Debug)]
pub struct ErrorKeeper<P> {
    next: P,
    held: Mutex<HashMap<TraceId, Held>>,
}

impl<P> ErrorKeeper<P> {
    pub fn new(next: P) -> Self {
        Self {
            next,
            held: Mutex::new(HashMap::new()),
        }
    }
}

impl<P> ErrorKeeper<P> {
    /// Holds an unsampled span; returns the spans its trace releases now (all of a failing one).
    fn hold(&self, span: SpanData) -> Vec<SpanData> {
        let trace = span.span_context.trace_id();
        let local_root = span.parent_span_id == SpanId::INVALID || span.parent_span_is_remote;
        let failed = matches!(span.status, Status::Error { .. });
        let mut held = self.held.lock();
        let now = Instant::now();
        if held.len() >= TRACES_HELD_MAX && !held.contains_key(&trace) {
            held.retain(|_, h| now.duration_since(h.since) < HOLD_MAX);
            if held.len() >= TRACES_HELD_MAX {
                // Still full: this trace is not kept unless it is failing right now.
                return if failed { vec![span] } else { Vec::new() };
            }
        }
        let entry = held.entry(trace).or_insert_with(|| Held {
            since: now,
            spans: Vec::new(),
            failed: false,
        });
        let mut release = Vec::new();
        if failed || entry.failed {
            entry.failed = true;
            release.append(&mut entry.spans);
            release.push(span);
        } else if entry.spans.len() < SPANS_PER_TRACE_MAX {
            entry.spans.push(span);
        }
        if local_root {
            held.remove(&trace);
        }
        release
    }
}

fn sampled(mut span: SpanData) -> SpanData {
    let sc = &span.span_context;
    span.span_context = SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().with_sampled(true),
        sc.is_remote(),
        sc.trace_state().clone(),
    );
    span
}

impl<P: SpanProcessor> SpanProcessor for ErrorKeeper<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.next.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if span.span_context.trace_flags() & TraceFlags::SAMPLED == TraceFlags::SAMPLED {
            self.next.on_end(span);
            return;
        }
        for span in self.hold(span) {
            self.next.on_end(sampled(span));
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.next.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.next.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.next.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor};

    fn span(trace: u128, id: u64, parent: u64, sampled: bool, failed: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(TraceId::from(trace), SpanId::from(id), flags, false, Default::default()),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: false,
            span_kind: opentelemetry::trace::SpanKind::Internal,
            name: format!("s{id}").into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: if failed { Status::error("failed") } else { Status::Unset },
            instrumentation_scope: Default::default(),
        }
    }

    #[test]
    fn unsampled_traces_are_exported_only_when_they_fail() {
        let exporter = InMemorySpanExporter::default();
        let keeper = ErrorKeeper::new(SimpleSpanProcessor::new(exporter.clone()));
        // A healthy unsampled trace: child then root; nothing exported.
        keeper.on_end(span(1, 2, 1, false, false));
        keeper.on_end(span(1, 1, 0, false, false));
        // A sampled trace passes straight through.
        keeper.on_end(span(2, 1, 0, true, false));
        // An unsampled trace whose second child fails: the held child, the failing one and the
        // root (which ends later) are all exported.
        keeper.on_end(span(3, 2, 1, false, false));
        keeper.on_end(span(3, 3, 1, false, true));
        keeper.on_end(span(3, 1, 0, false, false));
        let spans = exporter.get_finished_spans().expect("spans");
        let ids: Vec<(u128, u64)> = spans
            .iter()
            .map(|s| {
                (
                    u128::from_be_bytes(s.span_context.trace_id().to_bytes()),
                    u64::from_be_bytes(s.span_context.span_id().to_bytes()),
                )
            })
            .collect();
        assert_eq!(ids, vec![(2, 1), (3, 2), (3, 3), (3, 1)]);
        assert!(spans.iter().all(|s| s.span_context.is_sampled()));
        assert!(keeper.held.lock().is_empty(), "roots release their traces");
    }
}
