//! Adaptive trace sampling. A span with a parent follows the parent's decision; a new trace is
//! exported with probability `rate`, which the [`RateController`] moves between a configured
//! floor and 1.0: up when the share of failed or slow requests rises, back down as it falls.
//! Traces that are not exported are still recorded, so [`super::keep::ErrorKeeper`] can keep
//! one that turns out to contain an error.

use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Requests are counted per window; each closed window moves the rate.
pub const WINDOW: Duration = Duration::from_secs(1);
/// A request slower than this counts as slow.
pub const SLOW_REQUEST: Duration = Duration::from_millis(500);
/// A smoothed share of failed (or slow) requests at or above this exports every trace.
pub const FULL_PRESSURE: f64 = 0.2;
/// Weight of the newest window in the smoothed shares.
const SMOOTHING: f64 = 0.5;

#[derive(Debug)]
struct Window {
    started: Instant,
    requests: u64,
    errors: u64,
    slow: u64,
    error_share: f64,
    slow_share: f64,
}

/// Sans-IO: time comes in with every call, so tests drive it without sleeping.
#[derive(Debug)]
pub struct RateController {
    floor: f64,
    rate_bits: AtomicU64,
    window: Mutex<Window>,
}

impl RateController {
    pub fn new(floor: f64) -> Self {
        let floor = if floor.is_finite() { floor.clamp(0.0, 1.0) } else { 1.0 };
        Self {
            floor,
            rate_bits: AtomicU64::new(floor.to_bits()),
            window: Mutex::new(Window {
                started: Instant::now(),
                requests: 0,
                errors: 0,
                slow: 0,
                error_share: 0.0,
                slow_share: 0.0,
            }),
        }
    }

    pub fn floor(&self) -> f64 {
        self.floor
    }

    /// The share of new traces exported now.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    /// One finished request: failed or not, and how long it took.
    pub fn observe(&self, now: Instant, failed: bool, latency: Duration) {
        let mut window = self.window.lock();
        self.roll(&mut window, now);
        window.requests += 1;
        window.errors += u64::from(failed);
        window.slow += u64::from(latency >= SLOW_REQUEST);
    }

    /// Closes the windows that ended before `now` (an idle node decays towards the floor).
    pub fn tick(&self, now: Instant) {
        let mut window = self.window.lock();
        self.roll(&mut window, now);
    }

    fn roll(&self, window: &mut Window, now: Instant) {
        // Windows with no requests count as all-healthy; a few are enough to reach the floor.
        let mut closed = 0;
        while now.saturating_duration_since(window.started) >= WINDOW && closed < 16 {
            let (errors, slow) = match window.requests {
                0 => (0.0, 0.0),
                n => (window.errors as f64 / n as f64, window.slow as f64 / n as f64),
            };
            window.error_share = SMOOTHING * errors + (1.0 - SMOOTHING) * window.error_share;
            window.slow_share = SMOOTHING * slow + (1.0 - SMOOTHING) * window.slow_share;
            window.requests = 0;
            window.errors = 0;
            window.slow = 0;
            window.started += WINDOW;
            closed += 1;
        }
        if now.saturating_duration_since(window.started) >= WINDOW {
            window.started = now; // long idle: skip the rest
            window.error_share = 0.0;
            window.slow_share = 0.0;
        }
        let pressure = (window.error_share.max(window.slow_share) / FULL_PRESSURE).min(1.0);
        let rate = (self.floor + (1.0 - self.floor) * pressure).clamp(self.floor, 1.0);
        self.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }
}

/// Parent-based: a child follows its parent; a root is exported at the controller's rate.
/// Every span is at least recorded.
#[derive(Debug, Clone)]
pub struct AdaptiveSampler {
    controller: Arc<RateController>,
}

impl AdaptiveSampler {
    pub fn new(controller: Arc<RateController>) -> Self {
        Self { controller }
    }
}

/// Whether a trace id falls within `rate`, decided by its low 63 bits as OpenTelemetry's
/// ratio sampler does, so every node decides the same for the same trace.
pub fn within_rate(trace_id: TraceId, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or([0; 8])) >> 1;
    (low as f64) < rate * (1u64 << 63) as f64
}

impl ShouldSample for AdaptiveSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        let parent = parent_context
            .filter(|cx| cx.has_active_span())
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        let exported = match &parent {
            Some(parent) => parent.is_sampled(),
            None => within_rate(trace_id, self.controller.rate()),
        };
        SamplingResult {
            decision: if exported {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::RecordOnly
            },
            attributes: Vec::new(),
            trace_state: parent.map(|p| p.trace_state().clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(controller: &RateController, start: Instant, seconds: u64, per_second: u64, failing: u64) -> Instant {
        let mut now = start;
        for _ in 0..seconds {
            for i in 0..per_second {
                controller.observe(now, i < failing, Duration::from_millis(5));
            }
            now += WINDOW;
            controller.tick(now);
            let rate = controller.rate();
            assert!((controller.floor()..=1.0).contains(&rate), "rate {rate} out of bounds");
        }
        now
    }

    #[test]
    fn rate_follows_the_error_rate_within_bounds() {
        let controller = RateController::new(0.05);
        let start = Instant::now();
        let now = drive(&controller, start, 3, 100, 0);
        assert_eq!(controller.rate(), 0.05, "healthy traffic stays at the floor");
        let now = drive(&controller, now, 4, 100, 50);
        assert_eq!(controller.rate(), 1.0, "half the requests failing exports everything");
        // 5 % failing is a quarter of full pressure: the rate settles about a quarter of the way up.
        let now = drive(&controller, now, 12, 100, 5);
        let rate = controller.rate();
        assert!((0.25..0.35).contains(&rate), "rate {rate} for 5 % errors");
        drive(&controller, now, 12, 100, 0);
        assert!(
            controller.rate() < 0.06,
            "recovered traffic returns to the floor: {}",
            controller.rate()
        );
    }

    #[test]
    fn slow_requests_raise_the_rate_and_idleness_lowers_it() {
        let controller = RateController::new(0.1);
        let mut now = Instant::now();
        for _ in 0..4 {
            for _ in 0..10 {
                controller.observe(now, false, SLOW_REQUEST * 2);
            }
            now += WINDOW;
        }
        controller.tick(now);
        assert_eq!(controller.rate(), 1.0);
        controller.tick(now + Duration::from_secs(600));
        assert_eq!(controller.rate(), 0.1);
    }

    #[test]
    fn the_floor_is_clamped() {
        assert_eq!(RateController::new(-1.0).rate(), 0.0);
        assert_eq!(RateController::new(7.0).rate(), 1.0);
        assert_eq!(RateController::new(f64::NAN).rate(), 1.0);
    }

    #[test]
    fn ratio_decision_matches_the_share() {
        let mut hits = 0;
        for i in 0..10_000u128 {
            let id = TraceId::from_bytes((i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)).to_be_bytes());
            hits += u32::from(within_rate(id, 0.25));
        }
        assert!((2_300..2_700).contains(&hits), "{hits} of 10000 at 25 %");
        assert!(within_rate(TraceId::from_bytes([0xff; 16]), 1.0));
        assert!(!within_rate(TraceId::from_bytes([0xff; 16]), 0.0));
    }
}
