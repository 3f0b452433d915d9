//! An interceptor that taps the RTCP a remote peer sends about the media we send it: receiver
//! reports (loss, round-trip time), REMB estimates and keyframe requests. It records them into
//! a [`FeedbackState`] that the subscriber's forwarding task reads on its own schedule, and
//! passes every packet on unchanged. It runs inside the connection's sans-IO core, so it only
//! touches atomics.

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the remote last told us. Counters only grow; readers keep their last seen value.
#[derive(Debug, Default)]
pub struct FeedbackState {
    /// Incremented per receiver report block; `fraction_lost` holds the latest value.
    pub loss_reports: AtomicU64,
    pub fraction_lost: AtomicU32,
    /// Incremented per REMB; `remb_bps` holds the latest value.
    pub remb_reports: AtomicU64,
    pub remb_bps: AtomicU64,
    /// Where each round-trip time is observed once, as it is computed (subscribers only).
    pub rtt_seconds: Option<prometheus::Histogram>,
    /// Incremented per PLI or FIR.
    pub keyframe_requests: AtomicU64,
}

/// Queues are bounded by the chain: every handled message is polled out before the next.
pub struct FeedbackTap {
    state: Arc<FeedbackState>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl FeedbackTap {
    pub fn new(state: Arc<FeedbackState>) -> Self {
        Self {
            state,
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }

    fn record(&self, packet: &dyn rtc::rtcp::Packet) {
        let any = packet.as_any();
        if let Some(report) = any.downcast_ref::<ReceiverReport>() {
            self.record_blocks(&report.reports);
        } else if let Some(report) = any.downcast_ref::<SenderReport>() {
            self.record_blocks(&report.reports);
        } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
            if remb.bitrate.is_finite() && remb.bitrate > 0.0 {
                self.state.remb_bps.store(remb.bitrate as u64, Ordering::Relaxed);
                self.state.remb_reports.fetch_add(1, Ordering::Relaxed);
            }
        } else if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
            self.state.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_blocks(&self, blocks: &[rtc::rtcp::reception_report::ReceptionReport]) {
        for block in blocks {
            self.state
                .fraction_lost
                .store(u32::from(block.fraction_lost), Ordering::Relaxed);
            self.state.loss_reports.fetch_add(1, Ordering::Relaxed);
            if block.last_sender_report != 0
                && let Some(histogram) = &self.state.rtt_seconds
            {
                // RFC 3550 §6.4.1: RTT = now - LSR - DLSR, in 1/65536 s of the middle NTP bits.
                let rtt = ntp_middle_32(SystemTime::now())
                    .wrapping_sub(block.last_sender_report)
                    .wrapping_sub(block.delay);
                if rtt < 65_536 * 10 {
                    histogram.observe(f64::from(rtt) / 65_536.0);
                }
            }
        }
    }
}

/// The middle 32 bits of the NTP timestamp of `time` (16.16 fixed-point seconds).
fn ntp_middle_32(time: SystemTime) -> u32 {
    const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;
    let since_unix = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_unix.as_secs() + NTP_UNIX_OFFSET_S;
    let fraction = (u64::from(since_unix.subsec_nanos()) << 32) / 1_000_000_000;
    (((seconds & 0xFFFF) << 16) | (fraction >> 16)) as u32
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = std::time::Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for packet in packets {
                self.record(packet.as_ref());
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ntp_middle_bits_advance_with_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = ntp_middle_32(t);
        let b = ntp_middle_32(t + Duration::from_millis(500));
        assert_eq!(b.wrapping_sub(a), 32_768);
    }

    #[test]
    fn records_reports() {
        let state = Arc::new(FeedbackState::default());
        let tap = FeedbackTap::new(state.clone());
        tap.record(&ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 1_250_000.0,
            ssrcs: vec![2],
        });
        tap.record(&PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 2,
        });
        tap.record(&ReceiverReport {
            ssrc: 1,
            reports: vec![rtc::rtcp::reception_report::ReceptionReport {
                ssrc: 2,
                fraction_lost: 26,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(state.remb_bps.load(Ordering::Relaxed), 1_250_000);
        assert_eq!(state.keyframe_requests.load(Ordering::Relaxed), 1);
        assert_eq!(state.fraction_lost.load(Ordering::Relaxed), 26);
        assert_eq!(state.loss_reports.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn each_round_trip_is_observed_once() {
        let histogram = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("rtt", "rtt")).expect("valid");
        let state = Arc::new(FeedbackState {
            rtt_seconds: Some(histogram.clone()),
            ..FeedbackState::default()
        });
        let tap = FeedbackTap::new(state);
        // Our sender report went out 40 ms ago and the viewer held it 10 ms: 30 ms round trip.
        let sent = ntp_middle_32(SystemTime::now() - Duration::from_millis(40));
        tap.record(&ReceiverReport {
            ssrc: 1,
            reports: vec![rtc::rtcp::reception_report::ReceptionReport {
                ssrc: 2,
                last_sender_report: sent,
                delay: 655, // 10 ms in 1/65536 s
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(histogram.get_sample_count(), 1);
        let rtt = histogram.get_sample_sum();
        assert!((0.025..0.2).contains(&rtt), "{rtt}");
    }
}
