//! Receive statistics of one track: packets, bytes, loss from sequence-number gaps (across the
//! 16-bit wraparound), frames, the largest gap between frames and the first complete keyframe.
//! Sans-IO: the caller passes each packet's header fields and the time it arrived.

use std::time::{Duration, Instant};

/// A sequence-number jump larger than this is treated as a new stream, not as loss
/// (RFC 3550 appendix A.1 uses 3000 as MAX_DROPOUT).
const SEQUENCE_DROPOUT_MAX: u16 = 3_000;

/// Expected and received packet counts from sequence numbers, RFC 3550 appendix A.3 style:
/// `expected = extended highest - base + 1`, `lost = expected - received`. Reordered and
/// retransmitted packets count as received without moving the highest number; duplicates among
/// the last [`DUPLICATE_WINDOW`] numbers are recognised and not counted twice.
#[derive(Debug, Clone, Default)]
pub struct SequenceTracker {
    started: bool,
    /// Extended (wrap-counted) sequence number of the first packet.
    base: u64,
    /// Extended highest sequence number seen.
    highest: u64,
    /// Distinct packets received.
    received: u64,
    /// Bit `i` set: `highest - i` was received.
    window: u128,
}

/// How far back duplicates are recognised.
pub const DUPLICATE_WINDOW: u64 = 128;

impl SequenceTracker {
    pub fn on_packet(&mut self, sequence_number: u16) {
        if !self.started {
            self.started = true;
            self.base = u64::from(sequence_number) + (1 << 16);
            self.highest = self.base;
            self.received = 1;
            self.window = 1;
            return;
        }
        let forward = sequence_number.wrapping_sub(self.highest as u16);
        if forward == 0 {
            return; // duplicate of the highest
        }
        if forward < 0x8000 {
            let forward = u64::from(forward);
            self.highest += forward;
            self.window = if forward >= DUPLICATE_WINDOW {
                0
            } else {
                self.window << forward
            };
            self.window |= 1;
            self.received += 1;
            if forward > u64::from(SEQUENCE_DROPOUT_MAX) {
                // The sender restarted its sequence: count from here as a new stream.
                self.base = self.highest + 1 - self.received;
            }
            return;
        }
        // An older packet (reordered or retransmitted): received, highest unchanged.
        let behind = u64::from(self.highest as u16).wrapping_sub(u64::from(sequence_number)) & 0xFFFF;
        if behind < DUPLICATE_WINDOW {
            let bit = 1u128 << behind;
            if self.window & bit != 0 {
                return; // duplicate
            }
            self.window |= bit;
        }
        if self.highest - behind >= self.base {
            self.received += 1;
        }
    }

    /// Distinct packets received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Packets the sender sent between the first and the highest one received.
    pub fn expected(&self) -> u64 {
        if self.started { self.highest - self.base + 1 } else { 0 }
    }

    /// Packets never received.
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }
}

/// What a receiver knows about one track at a point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrackStats {
    pub packets: u64,
    /// RTP payload bytes.
    pub bytes: u64,
    /// Packets expected from the sequence numbers seen.
    pub packets_expected: u64,
    pub packets_lost: u64,
    /// Distinct frames (RTP timestamps) seen; for audio, one per packet.
    pub frames: u64,
    /// Frames whose last packet (marker bit) arrived.
    pub frames_complete: u64,
    /// Video frames that started a keyframe.
    pub keyframes: u64,
    /// Largest time between the first packets of two consecutive frames.
    pub frame_gap_max: Duration,
    /// When the first packet arrived.
    pub first_packet_at: Option<Instant>,
    /// When the first keyframe was received complete and without a gap.
    pub first_keyframe_at: Option<Instant>,
    /// The picture size of the latest keyframe (VP8), 0×0 before one: tells which simulcast
    /// layer is arriving.
    pub keyframe_width: u16,
    pub keyframe_height: u16,
}

impl TrackStats {
    /// Lost packets as a fraction of expected packets (0 when nothing was expected).
    pub fn loss_fraction(&self) -> f64 {
        if self.packets_expected == 0 {
            0.0
        } else {
            self.packets_lost as f64 / self.packets_expected as f64
        }
    }
}

/// The frame being received, to tell whether a keyframe arrived complete.
#[derive(Debug, Clone, Copy)]
struct CurrentFrame {
    timestamp: u32,
    keyframe: bool,
    /// Every packet since the frame's first arrived in order with no gap.
    intact: bool,
    next_sequence: u16,
    completed: bool,
}

/// Per-track receive statistics, fed one packet at a time.
#[derive(Debug, Clone)]
pub struct ReceiveStats {
    video: bool,
    sequence: SequenceTracker,
    /// Expected and received packets of earlier connections (see [`ReceiveStats::restart`]).
    carried_expected: u64,
    carried_received: u64,
    stats: TrackStats,
    frame: Option<CurrentFrame>,
    last_frame_start: Option<Instant>,
}

/// The header fields and payload facts the statistics need from one packet.
#[derive(Debug, Clone, Copy)]
pub struct PacketInfo {
    pub sequence_number: u16,
    pub timestamp: u32,
    pub marker: bool,
    /// The payload starts a keyframe (see [`crate::media::vp8_keyframe_start`]).
    pub keyframe_start: bool,
    /// The picture size it announces, when it does (see [`crate::media::vp8_keyframe_size`]).
    pub keyframe_size: Option<(u16, u16)>,
    pub payload_bytes: usize,
}

impl ReceiveStats {
    pub fn new(video: bool) -> Self {
        Self {
            video,
            sequence: SequenceTracker::default(),
            carried_expected: 0,
            carried_received: 0,
            stats: TrackStats::default(),
            frame: None,
            last_frame_start: None,
        }
    }

    pub fn snapshot(&self) -> TrackStats {
        self.stats
    }

    /// A new connection starts a new sequence-number space: the counts so far are kept, the
    /// sequence tracking and the frame in progress start over. The largest gap between frames
    /// spans the reconnect, as the viewer saw it.
    pub fn restart(&mut self) {
        self.carried_expected += self.sequence.expected();
        self.carried_received += self.sequence.received();
        self.sequence = SequenceTracker::default();
        self.frame = None;
    }

    pub fn on_packet(&mut self, packet: PacketInfo, now: Instant) {
        self.sequence.on_packet(packet.sequence_number);
        let stats = &mut self.stats;
        stats.packets += 1;
        stats.bytes += packet.payload_bytes as u64;
        stats.packets_expected = self.carried_expected + self.sequence.expected();
        stats.packets_lost = stats
            .packets_expected
            .saturating_sub(self.carried_received + self.sequence.received());
        stats.first_packet_at.get_or_insert(now);

        let new_frame = match &self.frame {
            None => true,
            // An older timestamp is a late packet of an earlier frame, not a new one.
            Some(frame) => {
                let ahead = packet.timestamp.wrapping_sub(frame.timestamp);
                ahead != 0 && ahead < 0x8000_0000
            }
        };
        if new_frame {
            stats.frames += 1;
            if let Some(previous) = self.last_frame_start {
                stats.frame_gap_max = stats.frame_gap_max.max(now.saturating_duration_since(previous));
            }
            self.last_frame_start = Some(now);
            let keyframe = self.video && packet.keyframe_start;
            if keyframe {
                stats.keyframes += 1;
                if let Some((width, height)) = packet.keyframe_size {
                    (stats.keyframe_width, stats.keyframe_height) = (width, height);
                }
            }
            self.frame = Some(CurrentFrame {
                timestamp: packet.timestamp,
                keyframe,
                // A video frame is only known to be whole if its first packet starts it.
                intact: !self.video || packet.keyframe_start,
                next_sequence: packet.sequence_number,
                completed: false,
            });
        }
        let Some(frame) = self.frame.as_mut() else {
            unreachable!("set above for a new frame, kept otherwise");
        };
        if frame.timestamp != packet.timestamp {
            return; // a late packet of an earlier frame
        }
        if packet.sequence_number != frame.next_sequence {
            frame.intact = false;
        }
        frame.next_sequence = packet.sequence_number.wrapping_add(1);
        let ends_frame = packet.marker || !self.video;
        if ends_frame && !frame.completed {
            frame.completed = true;
            stats.frames_complete += 1;
            if self.video && frame.keyframe && frame.intact && stats.first_keyframe_at.is_none() {
                stats.first_keyframe_at = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(sequence: impl IntoIterator<Item = u16>) -> SequenceTracker {
        let mut tracker = SequenceTracker::default();
        for s in sequence {
            tracker.on_packet(s);
        }
        tracker
    }

    #[test]
    fn no_loss_in_order() {
        let t = tracker(100..200);
        assert_eq!((t.expected(), t.received(), t.lost()), (100, 100, 0));
    }

    #[test]
    fn gaps_are_lost_packets() {
        let t = tracker([1, 2, 5, 6, 10]);
        assert_eq!(t.expected(), 10);
        assert_eq!(t.lost(), 5);
    }

    #[test]
    fn loss_across_wraparound() {
        let sequence = (65_530u16..=65_535).chain(0..10).filter(|s| *s != 65_534 && *s != 2);
        let t = tracker(sequence);
        assert_eq!(t.expected(), 16);
        assert_eq!(t.received(), 14);
        assert_eq!(t.lost(), 2);
    }

    #[test]
    fn reordered_and_retransmitted_packets_are_not_lost() {
        let t = tracker([10, 12, 11, 13]);
        assert_eq!(t.lost(), 0);
        // A retransmission arriving after the wrap of the highest number.
        let t = tracker([65_534, 0, 1, 65_535]);
        assert_eq!((t.expected(), t.lost()), (4, 0));
        // Duplicates are counted once and never hide a loss.
        let t = tracker([5, 5, 6, 6, 8, 6]);
        assert_eq!((t.received(), t.lost()), (3, 1));
        // A packet older than the first one is not part of the count.
        let t = tracker([100, 101, 99]);
        assert_eq!((t.expected(), t.received(), t.lost()), (2, 2, 0));
    }

    #[test]
    fn large_jump_restarts_the_count() {
        let t = tracker([1, 2, 3, 10_000, 10_001]);
        assert_eq!(t.lost(), 0, "a jump past the dropout limit is a new stream");
        assert_eq!(t.expected(), 5);
    }

    fn packet(sequence_number: u16, timestamp: u32, marker: bool, keyframe_start: bool) -> PacketInfo {
        PacketInfo {
            sequence_number,
            timestamp,
            marker,
            keyframe_start,
            keyframe_size: keyframe_start.then_some((320, 240)),
            payload_bytes: 1_000,
        }
    }

    #[test]
    fn restart_keeps_counts_and_forgets_the_old_sequence() {
        let now = Instant::now();
        let mut stats = ReceiveStats::new(true);
        for sequence in [10, 11, 13] {
            stats.on_packet(packet(sequence, u32::from(sequence), true, sequence == 10), now);
        }
        assert_eq!(
            (stats.snapshot().packets_expected, stats.snapshot().packets_lost),
            (4, 1)
        );
        assert_eq!(
            (stats.snapshot().keyframe_width, stats.snapshot().keyframe_height),
            (320, 240)
        );
        // A new connection starts at an unrelated, lower sequence number: no loss, no reorder.
        stats.restart();
        for sequence in [40_000, 40_001] {
            stats.on_packet(packet(sequence, u32::from(sequence), true, false), now);
        }
        let snapshot = stats.snapshot();
        assert_eq!(
            (snapshot.packets, snapshot.packets_expected, snapshot.packets_lost),
            (5, 6, 1)
        );
    }

    #[test]
    fn frames_gaps_and_first_keyframe() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut stats = ReceiveStats::new(true);
        // An interframe joined mid-way: not a keyframe.
        stats.on_packet(packet(10, 0, true, false), at(0));
        // A keyframe missing its middle packet (seq 13): not intact.
        stats.on_packet(packet(12, 3_000, false, true), at(33));
        stats.on_packet(packet(14, 3_000, true, false), at(34));
        assert_eq!(stats.snapshot().first_keyframe_at, None);
        // A whole keyframe, 200 ms later.
        stats.on_packet(packet(15, 6_000, false, true), at(234));
        stats.on_packet(packet(16, 6_000, false, false), at(235));
        stats.on_packet(packet(17, 6_000, true, false), at(236));
        // A late duplicate of an older frame changes nothing but the packet count.
        stats.on_packet(packet(14, 3_000, true, false), at(240));
        let s = stats.snapshot();
        assert_eq!(s.first_keyframe_at, Some(at(236)));
        assert_eq!(s.frames, 3);
        assert_eq!(s.frames_complete, 3);
        assert_eq!(s.keyframes, 2);
        assert_eq!(s.frame_gap_max, Duration::from_millis(201));
        assert_eq!(s.packets, 7);
        assert_eq!(s.packets_expected, 8);
        assert_eq!(s.packets_lost, 2, "11 and 13; the duplicate 14 is not counted twice");
        assert_eq!(s.first_packet_at, Some(at(0)));
    }

    #[test]
    fn audio_counts_every_packet_as_a_frame() {
        let start = Instant::now();
        let mut stats = ReceiveStats::new(false);
        for i in 0..50u16 {
            stats.on_packet(
                packet(i, u32::from(i) * 960, i == 0, false),
                start + Duration::from_millis(20 * u64::from(i)),
            );
        }
        let s = stats.snapshot();
        assert_eq!((s.frames, s.frames_complete, s.keyframes), (50, 50, 0));
        assert_eq!(s.frame_gap_max, Duration::from_millis(20));
        assert_eq!(s.loss_fraction(), 0.0);
    }
}
