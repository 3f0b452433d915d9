//! Simulcast layer choice for one subscriber. Sans-IO: layer bitrates, the bandwidth estimate,
//! keyframe arrivals and time go in; the layer to forward and keyframe requests come out.
//! A switch takes effect only on a keyframe of the new layer, so the decoder never sees a
//! delta frame whose reference it does not have.

use std::time::{Duration, Instant};

/// Layers are numbered from 0 (lowest resolution) upwards.
pub const LAYERS_MAX: usize = 3;

/// The names clients give the layers (WHEP `?layer=`, signal `set_layer`), lowest first.
pub const LAYER_NAMES: [&str; LAYERS_MAX] = ["low", "mid", "high"];

/// The layer index of a name from [`LAYER_NAMES`].
pub fn layer_named(name: &str) -> Option<u8> {
    LAYER_NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

/// Headroom: a layer is chosen only if the estimate exceeds its bitrate by this factor.
const UPGRADE_HEADROOM: f64 = 1.15;
/// The target changes at most this often, so a noisy estimate does not flap between layers.
const TARGET_HOLD: Duration = Duration::from_secs(2);
/// At most one keyframe request per layer per this interval from one subscriber.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerView {
    /// Measured bitrate of the layer over the last second.
    pub bitrate_bps: u64,
    /// Whether packets of this layer arrived recently.
    pub alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAction {
    /// Ask the publisher for a keyframe on this layer.
    RequestKeyframe(u8),
}

#[derive(Debug)]
pub struct LayerSelector {
    /// Highest layer the subscriber asked for (`?layer=`); `None` means no cap.
    preference: Option<u8>,
    current: Option<u8>,
    target: Option<u8>,
    target_set_at: Option<Instant>,
    last_keyframe_request: [Option<Instant>; LAYERS_MAX],
}

impl LayerSelector {
    pub fn new(preference: Option<u8>) -> Self {
        Self {
            preference,
            current: None,
            target: None,
            target_set_at: None,
            last_keyframe_request: [None; LAYERS_MAX],
        }
    }

    pub fn current(&self) -> Option<u8> {
        self.current
    }

    pub fn target(&self) -> Option<u8> {
        self.target
    }

    pub fn set_preference(&mut self, preference: Option<u8>) {
        self.preference = preference;
        self.target_set_at = None; // an explicit choice is not held back by hysteresis
    }

    /// Bit mask of the layers whose packets this subscriber needs now.
    pub fn wanted_mask(&self) -> u8 {
        let mut mask = 0u8;
        for layer in [self.current, self.target].into_iter().flatten() {
            mask |= 1 << layer;
        }
        mask
    }

    /// The layer the subscriber should get for an estimate, ignoring hysteresis.
    fn best_layer(&self, layers: &[LayerView], estimate_bps: u64) -> Option<u8> {
        let cap = self
            .preference
            .map_or(layers.len(), |p| usize::from(p) + 1)
            .min(layers.len());
        let alive: Vec<u8> = (0..layers.len())
            .filter(|&i| layers[i].alive)
            .map(|i| i as u8)
            .collect();
        let lowest_alive = *alive.first()?;
        let best = alive
            .iter()
            .copied()
            .filter(|&i| usize::from(i) < cap)
            .filter(|&i| (layers[usize::from(i)].bitrate_bps as f64) * UPGRADE_HEADROOM <= estimate_bps as f64)
            .max();
        // Below the cap nothing fits: the lowest layer under the cap, else the lowest alive.
        Some(best.unwrap_or_else(|| {
            alive
                .iter()
                .copied()
                .find(|&i| usize::from(i) < cap)
                .unwrap_or(lowest_alive)
        }))
    }

    /// Re-evaluates the target; returns a keyframe request when a switch is pending.
    pub fn evaluate(&mut self, layers: &[LayerView], estimate_bps: u64, now: Instant) -> Option<LayerAction> {
        debug_assert!(layers.len() <= LAYERS_MAX);
        let best = self.best_layer(layers, estimate_bps);
        let current_dead = self
            .current
            .is_some_and(|c| !layers.get(usize::from(c)).is_some_and(|l| l.alive));
        let held = self
            .target_set_at
            .is_some_and(|at| now.saturating_duration_since(at) < TARGET_HOLD);
        if best != self.target && (!held || current_dead || self.target.is_none()) {
            self.target = best;
            self.target_set_at = Some(now);
        }
        let target = self.target?;
        if self.current == Some(target) {
            return None;
        }
        let slot = &mut self.last_keyframe_request[usize::from(target)];
        if slot.is_none_or(|at| now.saturating_duration_since(at) >= KEYFRAME_REQUEST_INTERVAL) {
            *slot = Some(now);
            return Some(LayerAction::RequestKeyframe(target));
        }
        None
    }

    /// Decides whether a packet of `layer` is forwarded; a keyframe start on the target layer
    /// completes a pending switch.
    pub fn accept(&mut self, layer: u8, keyframe_start: bool) -> bool {
        if self.target == Some(layer) && self.current != Some(layer) && keyframe_start {
            self.current = Some(layer);
        }
        self.current == Some(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(bitrates: &[u64]) -> Vec<LayerView> {
        bitrates
            .iter()
            .map(|&bitrate_bps| LayerView {
                bitrate_bps,
                alive: true,
            })
            .collect()
    }

    #[test]
    fn picks_highest_sustainable_and_switches_on_keyframe_only() {
        let now = Instant::now();
        let mut selector = LayerSelector::new(None);
        let views = layers(&[150_000, 500_000, 1_500_000]);
        assert_eq!(
            selector.evaluate(&views, 1_000_000, now),
            Some(LayerAction::RequestKeyframe(1))
        );
        assert_eq!(selector.target(), Some(1));
        assert!(!selector.accept(1, false), "no delta frame before the first keyframe");
        assert!(!selector.accept(0, true), "keyframes of other layers do not switch");
        assert!(selector.accept(1, true));
        assert!(selector.accept(1, false));
        assert_eq!(selector.wanted_mask(), 0b010);

        // More bandwidth: the target moves up only after the hold time, then waits for a keyframe.
        assert_eq!(
            selector.evaluate(&views, 5_000_000, now + Duration::from_millis(100)),
            None
        );
        assert_eq!(selector.target(), Some(1));
        let later = now + TARGET_HOLD;
        assert_eq!(
            selector.evaluate(&views, 5_000_000, later),
            Some(LayerAction::RequestKeyframe(2))
        );
        assert_eq!(selector.wanted_mask(), 0b110);
        assert!(selector.accept(1, false), "keeps the old layer until the new keyframe");
        assert!(!selector.accept(2, false));
        assert!(selector.accept(2, true));
        assert!(!selector.accept(1, false));
    }

    #[test]
    fn preference_caps_and_dead_layers_are_skipped() {
        let now = Instant::now();
        let mut selector = LayerSelector::new(Some(0));
        let views = layers(&[150_000, 500_000, 1_500_000]);
        selector.evaluate(&views, 50_000_000, now);
        assert_eq!(selector.target(), Some(0));

        let mut selector = LayerSelector::new(None);
        let mut views = layers(&[150_000, 500_000, 1_500_000]);
        views[2].alive = false;
        selector.evaluate(&views, 50_000_000, now);
        assert_eq!(selector.target(), Some(1));
        // Too little bandwidth for anything: still the lowest layer, never nothing.
        let mut selector = LayerSelector::new(None);
        selector.evaluate(&layers(&[150_000]), 10_000, now);
        assert_eq!(selector.target(), Some(0));
    }

    #[test]
    fn keyframe_requests_are_throttled() {
        let now = Instant::now();
        let mut selector = LayerSelector::new(None);
        let views = layers(&[100_000]);
        assert!(selector.evaluate(&views, 1_000_000, now).is_some());
        assert!(
            selector
                .evaluate(&views, 1_000_000, now + Duration::from_millis(10))
                .is_none()
        );
        assert!(
            selector
                .evaluate(&views, 1_000_000, now + KEYFRAME_REQUEST_INTERVAL)
                .is_some()
        );
    }
}
