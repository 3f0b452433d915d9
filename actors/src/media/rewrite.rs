//! Per-subscriber RTP header rewriting: one outgoing SSRC, payload type, sequence number space
//! and timestamp line, however often the source behind it changes (simulcast layer switch,
//! keyframe-cache replay, another publisher taking over the slot). Sans-IO: time is an input.

use std::time::Instant;

/// The rewritten header fields of one outgoing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewrittenHeader {
    pub ssrc: u32,
    pub payload_type: u8,
    pub sequence_number: u16,
    pub timestamp: u32,
}

/// Keeps an outgoing stream continuous across source switches.
#[derive(Debug)]
pub struct RtpRewriter {
    ssrc: u32,
    payload_type: u8,
    clock_rate: u32,
    /// Added (wrapping) to the incoming sequence number of the current source.
    sequence_offset: u16,
    /// Added (wrapping) to the incoming timestamp of the current source.
    timestamp_offset: u32,
    /// Identity of the current source (an SSRC); `None` before the first packet.
    source: Option<u32>,
    last_out: Option<LastOut>,
}

#[derive(Debug, Clone, Copy)]
struct LastOut {
    sequence_number: u16,
    timestamp: u32,
    at: Instant,
}

impl RtpRewriter {
    pub fn new(ssrc: u32, payload_type: u8, clock_rate: u32) -> Self {
        assert!(clock_rate > 0, "clock rate comes from a codec table, never zero");
        Self {
            ssrc,
            payload_type,
            clock_rate,
            sequence_offset: rand::random(),
            timestamp_offset: rand::random(),
            source: None,
            last_out: None,
        }
    }

    /// Whether the next packet from `source_ssrc` needs [`Self::switch_source`] first.
    pub fn is_new_source(&self, source_ssrc: u32) -> bool {
        self.source != Some(source_ssrc)
    }

    /// Makes the next packet re-anchor the stream even when it comes from the same source: after
    /// a pause (mute, unsubscribe) the source's sequence numbers jumped, and the viewer would
    /// count the packets it was never meant to get as lost.
    pub fn restart(&mut self) {
        self.source = None;
    }

    /// Re-anchors the offsets so that the first packet of the new source continues the
    /// outgoing stream: next sequence number, and a timestamp advanced by the wall time since
    /// the last packet sent (at least one tick, so timestamps never repeat across sources).
    pub fn switch_source(&mut self, source_ssrc: u32, first_sequence: u16, first_timestamp: u32, now: Instant) {
        if let Some(last) = self.last_out {
            let elapsed_ms = now.saturating_duration_since(last.at).as_millis() as u64;
            let elapsed_ticks = (elapsed_ms * u64::from(self.clock_rate) / 1000).max(1) as u32;
            let next_sequence = last.sequence_number.wrapping_add(1);
            let next_timestamp = last.timestamp.wrapping_add(elapsed_ticks);
            self.sequence_offset = next_sequence.wrapping_sub(first_sequence);
            self.timestamp_offset = next_timestamp.wrapping_sub(first_timestamp);
        }
        self.source = Some(source_ssrc);
    }

    /// Rewrites one packet of the current source.
    pub fn rewrite(&mut self, sequence_number: u16, timestamp: u32, now: Instant) -> RewrittenHeader {
        let out = RewrittenHeader {
            ssrc: self.ssrc,
            payload_type: self.payload_type,
            sequence_number: sequence_number.wrapping_add(self.sequence_offset),
            timestamp: timestamp.wrapping_add(self.timestamp_offset),
        };
        let newer = match self.last_out {
            None => true,
            // RFC 3550 serial-number comparison: newer when ahead by less than half the space.
            Some(last) => out.sequence_number.wrapping_sub(last.sequence_number) < 0x8000,
        };
        if newer {
            self.last_out = Some(LastOut {
                sequence_number: out.sequence_number,
                timestamp: out.timestamp,
                at: now,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn continuous_across_source_switch() {
        let start = Instant::now();
        let mut rewriter = RtpRewriter::new(42, 96, 90_000);
        rewriter.switch_source(1, 100, 1_000, start);
        let a = rewriter.rewrite(100, 1_000, start);
        let b = rewriter.rewrite(101, 4_000, start + Duration::from_millis(33));
        assert_eq!(b.sequence_number, a.sequence_number.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(3_000));
        assert_eq!((b.ssrc, b.payload_type), (42, 96));

        // Switch to a source with unrelated numbering 100 ms later.
        assert!(rewriter.is_new_source(2));
        let later = start + Duration::from_millis(133);
        rewriter.switch_source(2, 60_000, 9_999_999, later);
        let c = rewriter.rewrite(60_000, 9_999_999, later);
        assert_eq!(c.sequence_number, b.sequence_number.wrapping_add(1));
        assert_eq!(c.timestamp, b.timestamp.wrapping_add(9_000));
        let d = rewriter.rewrite(60_001, 9_999_999 + 3_000, later);
        assert_eq!(d.sequence_number, c.sequence_number.wrapping_add(1));
    }

    #[test]
    fn restart_hides_a_pause_of_the_same_source() {
        let start = Instant::now();
        let mut rewriter = RtpRewriter::new(42, 96, 90_000);
        rewriter.switch_source(1, 100, 1_000, start);
        let a = rewriter.rewrite(100, 1_000, start);
        // 300 packets were not forwarded (muted); without a restart the viewer sees a gap.
        assert!(!rewriter.is_new_source(1));
        rewriter.restart();
        assert!(rewriter.is_new_source(1));
        let later = start + Duration::from_secs(2);
        rewriter.switch_source(1, 400, 181_000, later);
        let b = rewriter.rewrite(400, 181_000, later);
        assert_eq!(b.sequence_number, a.sequence_number.wrapping_add(1));
    }

    #[test]
    fn wraps_and_keeps_reordering() {
        let now = Instant::now();
        let mut rewriter = RtpRewriter::new(7, 111, 48_000);
        rewriter.switch_source(9, u16::MAX, u32::MAX, now);
        let a = rewriter.rewrite(u16::MAX, u32::MAX, now);
        let b = rewriter.rewrite(0, 959, now);
        assert_eq!(b.sequence_number, a.sequence_number.wrapping_add(1));
        // A late packet keeps its relative position and does not move the anchor back.
        let late = rewriter.rewrite(u16::MAX - 1, u32::MAX - 960, now);
        assert_eq!(late.sequence_number, a.sequence_number.wrapping_sub(1));
        rewriter.switch_source(10, 5, 5, now);
        let c = rewriter.rewrite(5, 5, now);
        assert_eq!(c.sequence_number, b.sequence_number.wrapping_add(1));
    }
}
