//! The codecs the SDK negotiates (VP8, H.264 and Opus), and an interceptor that notices keyframe
//! requests (PLI, FIR) about the media we send.

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::error::Error as RtcError;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const VP8_PAYLOAD_TYPE: u8 = 96;
pub(crate) const OPUS_PAYLOAD_TYPE: u8 = 111;
pub(crate) const H264_PAYLOAD_TYPE: u8 = 102;

pub(crate) fn h264_codec(nack: bool) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.into(),
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
        ..vp8_codec(nack)
    }
}

pub(crate) fn vp8_codec(nack: bool) -> RTCRtpCodec {
    let mut rtcp_feedback = vec![
        RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        },
        RTCPFeedback {
            typ: "nack".into(),
            parameter: "pli".into(),
        },
    ];
    if nack {
        rtcp_feedback.push(RTCPFeedback {
            typ: "nack".into(),
            parameter: String::new(),
        });
    }
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.into(),
        clock_rate: crate::media::VP8_CLOCK_RATE,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback,
    }
}

pub(crate) fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.into(),
        clock_rate: crate::media::OPUS_CLOCK_RATE,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

/// A media engine with VP8 (preferred), H.264 and Opus.
pub(crate) fn media_engine(nack: bool) -> Result<MediaEngine, RtcError> {
    let mut engine = MediaEngine::default();
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(nack),
            payload_type: VP8_PAYLOAD_TYPE,
        },
        RtpCodecKind::Video,
    )?;
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: h264_codec(nack),
            payload_type: H264_PAYLOAD_TYPE,
        },
        RtpCodecKind::Video,
    )?;
    engine.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus_codec(),
            payload_type: OPUS_PAYLOAD_TYPE,
        },
        RtpCodecKind::Audio,
    )?;
    // Simulcast layers are told apart by these (RFC 8852, RFC 8843).
    for uri in [SDES_MID_URI, SDES_RTP_STREAM_ID_URI] {
        engine.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: uri.to_string() },
            RtpCodecKind::Video,
            None,
        )?;
    }
    Ok(engine)
}

pub(crate) const SDES_MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
pub(crate) const SDES_RTP_STREAM_ID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

/// Counts PLI and FIR packets the remote sends; the video generator polls the counter. Runs
/// inside the connection's sans-IO core, so it only touches an atomic, and passes every packet
/// on unchanged.
pub(crate) struct KeyframeRequestTap {
    requests: Arc<AtomicU64>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl KeyframeRequestTap {
    pub fn new(requests: Arc<AtomicU64>) -> Self {
        Self {
            requests,
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = std::time::Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for packet in packets {
                let any = packet.as_any();
                if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                    self.requests.fetch_add(1, Ordering::Relaxed);
                }
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

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
