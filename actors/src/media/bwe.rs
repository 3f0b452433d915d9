//! Downlink bandwidth estimate for one subscriber, from what the viewer reports: REMB when the
//! viewer sends it, and the loss-based controller of GCC (draft-ietf-rmcat-gcc §6) from receiver
//! reports otherwise. Sans-IO: reports and time are inputs.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BweConfig {
    pub initial_bps: u64,
    pub min_bps: u64,
    pub max_bps: u64,
}

impl Default for BweConfig {
    fn default() -> Self {
        Self {
            initial_bps: 3_000_000,
            min_bps: 100_000,
            max_bps: 20_000_000,
        }
    }
}

/// How long a REMB value stays authoritative without a fresh one.
const REMB_FRESH: Duration = Duration::from_secs(3);
/// GCC: at most one increase per this interval while loss is low.
const INCREASE_INTERVAL: Duration = Duration::from_secs(1);
/// GCC: at most one decrease per this interval while loss is high.
const DECREASE_INTERVAL: Duration = Duration::from_millis(300);

#[derive(Debug)]
pub struct BandwidthEstimator {
    config: BweConfig,
    loss_based_bps: u64,
    last_change: Option<Instant>,
    remb: Option<(u64, Instant)>,
}

impl BandwidthEstimator {
    pub fn new(config: BweConfig) -> Self {
        assert!(config.min_bps <= config.initial_bps && config.initial_bps <= config.max_bps);
        Self {
            config,
            loss_based_bps: config.initial_bps,
            last_change: None,
            remb: None,
        }
    }

    /// A receiver estimated maximum bitrate from the viewer.
    pub fn on_remb(&mut self, bitrate_bps: u64, now: Instant) {
        self.remb = Some((bitrate_bps.clamp(self.config.min_bps, self.config.max_bps), now));
    }

    /// A receiver report: `fraction_lost` is the RTCP 8-bit fixed point fraction (x/256).
    pub fn on_loss_report(&mut self, fraction_lost: u8, now: Instant) {
        let loss = f64::from(fraction_lost) / 256.0;
        let since_change = self.last_change.map(|at| now.saturating_duration_since(at));
        if loss > 0.10 {
            if since_change.is_none_or(|d| d >= DECREASE_INTERVAL) {
                self.loss_based_bps = ((self.loss_based_bps as f64) * (1.0 - 0.5 * loss)) as u64;
                self.last_change = Some(now);
            }
        } else if loss < 0.02 && since_change.is_none_or(|d| d >= INCREASE_INTERVAL) {
            self.loss_based_bps = ((self.loss_based_bps as f64) * 1.08) as u64 + 1_000;
            self.last_change = Some(now);
        }
        self.loss_based_bps = self.loss_based_bps.clamp(self.config.min_bps, self.config.max_bps);
    }

    pub fn estimate_bps(&self, now: Instant) -> u64 {
        match self.remb {
            Some((remb, at)) if now.saturating_duration_since(at) < REMB_FRESH => remb.min(self.loss_based_bps),
            _ => self.loss_based_bps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_lowers_and_clean_reports_raise() {
        let start = Instant::now();
        let mut bwe = BandwidthEstimator::new(BweConfig::default());
        assert_eq!(bwe.estimate_bps(start), 3_000_000);
        bwe.on_loss_report(64, start); // 25 % loss
        let lowered = bwe.estimate_bps(start);
        assert!(lowered < 3_000_000 && lowered > 2_000_000, "{lowered}");
        // A second report within the decrease interval changes nothing.
        bwe.on_loss_report(64, start + Duration::from_millis(100));
        assert_eq!(bwe.estimate_bps(start), lowered);
        bwe.on_loss_report(0, start + Duration::from_secs(2));
        assert!(bwe.estimate_bps(start) > lowered);
    }

    #[test]
    fn remb_caps_while_fresh() {
        let start = Instant::now();
        let mut bwe = BandwidthEstimator::new(BweConfig::default());
        bwe.on_remb(500_000, start);
        assert_eq!(bwe.estimate_bps(start), 500_000);
        assert_eq!(bwe.estimate_bps(start + Duration::from_secs(10)), 3_000_000);
        bwe.on_remb(1, start);
        assert_eq!(bwe.estimate_bps(start), 100_000);
    }
}
