//! WHIP publishing of synthetic media: a VP8 video track at a target bitrate and an Opus track
//! of silence, paced in real time, answering keyframe requests (PLI, FIR) with a keyframe.

use crate::codecs::{self, KeyframeRequestTap};
use crate::error::Error;
use crate::files;
use crate::media::{
    FrameSizes, H264Packetizer, OPUS_CLOCK_RATE, OPUS_PACKET_DURATION_MS, VP8_CLOCK_RATE, Vp8Packetizer, opus_packet,
};
use crate::peer::{self, ConnectOptions, PeerEvents, SessionCore, Signaling};
use crate::signal;
use bytes::Bytes;
use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{configure_nack, configure_rtcp_reports};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

/// Slot of the keyframe-request tap in the interceptor chain (after the stock ones).
const KEYFRAME_TAP_SLOT: usize = 14_000;
/// Keyframes forced by requests are at least this far apart (what encoders do, roughly).
const FORCED_KEYFRAME_INTERVAL: Duration = Duration::from_millis(250);

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub video: bool,
    pub audio: bool,
    /// Target video bitrate, RTP payload bytes counted.
    pub video_bitrate_bps: u64,
    pub frame_rate: u32,
    /// A keyframe every this many frames (besides those asked for by PLI/FIR).
    pub keyframe_interval_frames: u32,
    pub width: u16,
    pub height: u16,
    /// Largest RTP payload; keep under the path MTU minus RTP/SRTP/UDP/IP overhead.
    pub rtp_payload_bytes_max: usize,
    /// Size of each 20 ms Opus packet.
    pub audio_payload_bytes: usize,
    /// Codec of the synthetic video (a `video_file` is always VP8).
    pub video_codec: VideoCodec,
    /// Send the VP8 frames of this IVF file (looped) instead of synthetic ones; its frame rate
    /// replaces `frame_rate`, and keyframes come where the file has them.
    pub video_file: Option<PathBuf>,
    /// Send the Opus packets of this Ogg file (looped, 20 ms each) instead of silence.
    pub audio_file: Option<PathBuf>,
    /// Send three simulcast layers (rids `q`, `h`, `f`: a quarter, half and the full size, the
    /// bitrate split 1:2:4) instead of one stream.
    pub simulcast: bool,
    pub connect: ConnectOptions,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            video: true,
            audio: true,
            video_bitrate_bps: 1_500_000,
            frame_rate: 30,
            keyframe_interval_frames: 60,
            width: 640,
            height: 480,
            rtp_payload_bytes_max: 1_200,
            audio_payload_bytes: 60,
            video_codec: VideoCodec::Vp8,
            video_file: None,
            audio_file: None,
            simulcast: false,
            connect: ConnectOptions::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    Vp8,
    H264,
}

/// Counters of a publishing session.
#[derive(Debug, Default)]
pub struct PublishCounters {
    pub video_packets: AtomicU64,
    pub video_bytes: AtomicU64,
    pub video_frames: AtomicU64,
    pub keyframes: AtomicU64,
    pub audio_packets: AtomicU64,
    pub audio_bytes: AtomicU64,
    /// PLI and FIR received.
    pub keyframe_requests: AtomicU64,
    /// Packets the local stack refused (not yet bound, or closing).
    pub write_errors: AtomicU64,
}

/// A snapshot of [`PublishCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishStats {
    pub video_packets: u64,
    pub video_bytes: u64,
    pub video_frames: u64,
    pub keyframes: u64,
    pub audio_packets: u64,
    pub audio_bytes: u64,
    pub keyframe_requests: u64,
    pub write_errors: u64,
}

/// A live WHIP session; media flows from [`publish`] returning until [`PublishSession::close`].
pub struct PublishSession {
    core: SessionCore,
    counters: Arc<PublishCounters>,
}

impl PublishSession {
    /// Absolute URL of the session resource on the server.
    pub fn location(&self) -> &str {
        self.core.location()
    }

    pub fn state(&self) -> RTCPeerConnectionState {
        self.core.state()
    }

    pub fn stats(&self) -> PublishStats {
        snapshot(&self.counters)
    }

    /// Stops the media, DELETEs the session and closes the connection.
    pub async fn close(mut self) -> Result<(), Error> {
        self.core.close().await
    }
}

pub(crate) fn snapshot(c: &PublishCounters) -> PublishStats {
    {
        PublishStats {
            video_packets: c.video_packets.load(Ordering::Relaxed),
            video_bytes: c.video_bytes.load(Ordering::Relaxed),
            video_frames: c.video_frames.load(Ordering::Relaxed),
            keyframes: c.keyframes.load(Ordering::Relaxed),
            audio_packets: c.audio_packets.load(Ordering::Relaxed),
            audio_bytes: c.audio_bytes.load(Ordering::Relaxed),
            keyframe_requests: c.keyframe_requests.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Publishes synthetic media to the WHIP endpoint `url` (e.g. `http://127.0.0.1:8080/whip/room`).
/// Returns once the connection is up and media is being sent.
pub async fn publish(url: &str, token: &str, options: PublishOptions) -> Result<PublishSession, Error> {
    if !options.video && !options.audio {
        return Err(Error::WebRtc("nothing to publish: video and audio are both off".into()));
    }
    if options.frame_rate == 0 || options.rtp_payload_bytes_max < 2 {
        return Err(Error::WebRtc(
            "frame rate must be positive and RTP payloads at least 2 bytes".into(),
        ));
    }
    let url = signal::parse_url(url)?;
    let http = options.connect.http.clone().unwrap_or_else(signal::default_http_client);
    let signaling = Signaling::Http {
        http,
        url,
        token: token.to_string(),
    };
    publish_over(signaling, options, Arc::new(PublishCounters::default())).await
}

/// Publishes with the offer sent through `signaling`; `counters` may be shared with an earlier
/// session of the same publisher (a reconnect).
pub(crate) async fn publish_over(
    signaling: Signaling,
    mut options: PublishOptions,
    counters: Arc<PublishCounters>,
) -> Result<PublishSession, Error> {
    let video_file = match &options.video_file {
        Some(path) => {
            if options.simulcast {
                return Err(Error::Media(
                    "simulcast is synthetic only: not with a video file".into(),
                ));
            }
            let video = files::load_ivf(path).map_err(Error::Media)?;
            options.frame_rate = video.frame_rate;
            (options.width, options.height) = (video.width, video.height);
            Some(Arc::new(video.frames))
        }
        None => None,
    };
    let audio_file = match &options.audio_file {
        Some(path) => Some(Arc::new(files::load_ogg_opus(path).map_err(Error::Media)?.packets)),
        None => None,
    };
    let video_codec = match (&video_file, options.video_codec) {
        (None, VideoCodec::H264) => codecs::h264_codec(true),
        _ => codecs::vp8_codec(true),
    };
    let keyframe_requests = Arc::new(AtomicU64::new(0));

    let mut media_engine = codecs::media_engine(true)?;
    let mut registry = configure_nack(Registry::new(), &mut media_engine);
    registry = configure_rtcp_reports(registry);
    registry = registry.with(
        Slot::from(KEYFRAME_TAP_SLOT),
        KeyframeRequestTap::new(Arc::clone(&keyframe_requests)),
    );
    let (events, mut watch) = PeerEvents::new();
    let pc = peer::build_peer(options.connect.bind_ip, media_engine, registry, events).await?;

    let mut tracks = Vec::new();
    if options.video {
        let rids: &[&str] = if options.simulcast { &SIMULCAST_RIDS } else { &[] };
        tracks.push((
            RtpCodecKind::Video,
            add_send_track(&pc, RtpCodecKind::Video, video_codec, rids).await?,
        ));
    }
    if options.audio {
        tracks.push((
            RtpCodecKind::Audio,
            add_send_track(&pc, RtpCodecKind::Audio, codecs::opus_codec(), &[]).await?,
        ));
    }
    let teardown = peer::negotiate(&pc, &mut watch, &signaling, &options.connect).await?;
    let mut core = SessionCore::new(pc, teardown, &options.connect, &watch, Vec::new());
    peer::wait_connected(&mut watch.state, options.connect.connect_timeout).await?;

    let mid = match core.pc.local_description().await {
        Some(local) => video_mid(&local.sdp),
        None => None,
    };
    for (kind, (track, streams, payload_type)) in tracks {
        for (index, (rid, ssrc)) in streams.into_iter().enumerate() {
            let counters = Arc::clone(&counters);
            let task = match kind {
                RtpCodecKind::Video => {
                    let mut layer_options = options.clone();
                    let stamp = match rid {
                        Some(rid) => {
                            // Layer `index` of three: 1/4, 1/2, 1 of the size; 1/7, 2/7, 4/7 of the bitrate.
                            let shift = (SIMULCAST_RIDS.len() - 1 - index) as u32;
                            layer_options.width = (options.width >> shift).max(16);
                            layer_options.height = (options.height >> shift).max(16);
                            layer_options.video_bitrate_bps = options.video_bitrate_bps * (1 << index) / 7;
                            payload_type.rid_stamp(mid.clone(), rid).await
                        }
                        None => None,
                    };
                    let frames = VideoFrames::new(&layer_options, video_file.clone());
                    tokio::spawn(send_video(
                        Arc::clone(&track),
                        ssrc,
                        payload_type.clone(),
                        stamp,
                        frames,
                        layer_options,
                        Arc::clone(&keyframe_requests),
                        counters,
                    ))
                }
                _ => {
                    let packets = match &audio_file {
                        Some(packets) => AudioPackets::File {
                            packets: Arc::clone(packets),
                            next: 0,
                        },
                        None => AudioPackets::Silence(opus_packet(options.audio_payload_bytes)),
                    };
                    tokio::spawn(send_audio(
                        Arc::clone(&track),
                        ssrc,
                        payload_type.clone(),
                        packets,
                        counters,
                    ))
                }
            };
            core.tasks.push(task);
        }
    }
    Ok(PublishSession { core, counters })
}

/// Rids of the simulcast layers, lowest first.
const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];

/// Adds a send-only track with one stream, or one per rid (simulcast); returns it with each
/// stream's rid and SSRC, and the sender whose negotiated payload type the packets must carry.
async fn add_send_track(
    pc: &Arc<dyn PeerConnection>,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    rids: &[&str],
) -> Result<(Arc<TrackLocalStaticRTP>, Vec<(Option<String>, u32)>, SenderPayloadType), Error> {
    let streams: Vec<(Option<String>, u32)> = if rids.is_empty() {
        vec![(None, rand::random())]
    } else {
        rids.iter().map(|rid| (Some(rid.to_string()), rand::random())).collect()
    };
    let label = if kind == RtpCodecKind::Video { "video" } else { "audio" };
    let encodings = streams
        .iter()
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.clone().unwrap_or_default(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "mediamesh-sdk".to_string(),
        format!("{label}-{:08x}", streams[0].1),
        label.to_string(),
        kind,
        encodings,
    )));
    let transceiver = pc
        .add_transceiver_from_track(
            Arc::clone(&track) as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                ..Default::default()
            }),
        )
        .await?;
    let sender = transceiver
        .sender()
        .await?
        .ok_or_else(|| Error::WebRtc("a send-only transceiver without a sender".into()))?;
    Ok((
        track,
        streams,
        SenderPayloadType {
            sender,
            mime_type: codec.mime_type,
        },
    ))
}

/// The `a=mid` of the first video section of a local description.
fn video_mid(sdp: &str) -> Option<String> {
    let mut in_video = false;
    for line in sdp.lines() {
        if line.starts_with("m=") {
            in_video = line.starts_with("m=video");
        } else if in_video && let Some(mid) = line.strip_prefix("a=mid:") {
            return Some(mid.trim().to_string());
        }
    }
    None
}

/// The header extensions a simulcast layer's packets carry so the receiver can tell the layers
/// apart: the negotiated ids, and the values.
#[derive(Debug, Clone)]
struct RidStamp {
    mid: Option<(u8, Bytes)>,
    rid: (u8, Bytes),
}

/// The sender and codec whose negotiated payload type a track must stamp on its packets.
#[derive(Clone)]
struct SenderPayloadType {
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    mime_type: String,
}

impl SenderPayloadType {
    async fn resolve(&self) -> Option<u8> {
        let parameters = self.sender.get_parameters().await.ok()?;
        parameters
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&self.mime_type))
            .map(|c| c.payload_type)
    }

    /// The extensions for simulcast layer `rid`, if the answer negotiated the rid extension.
    async fn rid_stamp(&self, mid: Option<String>, rid: String) -> Option<RidStamp> {
        let parameters = self.sender.get_parameters().await.ok()?;
        let id_of = |uri: &str| {
            parameters
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == uri)
                .map(|e| e.id as u8)
        };
        let rid_id = id_of(codecs::SDES_RTP_STREAM_ID_URI)?;
        let mid = mid
            .zip(id_of(codecs::SDES_MID_URI))
            .map(|(mid, id)| (id, Bytes::from(mid)));
        Some(RidStamp {
            mid,
            rid: (rid_id, Bytes::from(rid)),
        })
    }
}

/// Where a video stream's frames come from.
enum VideoFrames {
    Vp8 {
        packetizer: Vp8Packetizer,
        sizes: FrameSizes,
    },
    H264 {
        packetizer: H264Packetizer,
        sizes: FrameSizes,
    },
    Ivf {
        packetizer: Vp8Packetizer,
        frames: Arc<Vec<(bool, Bytes)>>,
        next: usize,
    },
}

impl VideoFrames {
    fn new(options: &PublishOptions, file: Option<Arc<Vec<(bool, Bytes)>>>) -> Self {
        let sizes = FrameSizes::for_bitrate(
            options.video_bitrate_bps,
            options.frame_rate,
            options.keyframe_interval_frames,
        );
        match (file, options.video_codec) {
            (Some(frames), _) => VideoFrames::Ivf {
                packetizer: Vp8Packetizer::new(options.width, options.height, options.rtp_payload_bytes_max),
                frames,
                next: 0,
            },
            (None, VideoCodec::H264) => VideoFrames::H264 {
                packetizer: H264Packetizer::new(options.rtp_payload_bytes_max),
                sizes,
            },
            (None, VideoCodec::Vp8) => VideoFrames::Vp8 {
                packetizer: Vp8Packetizer::new(options.width, options.height, options.rtp_payload_bytes_max),
                sizes,
            },
        }
    }

    /// Whether a file decides where keyframes are (requests cannot make one).
    fn is_file(&self) -> bool {
        matches!(self, VideoFrames::Ivf { .. })
    }

    /// The payloads of the next frame and whether it is a keyframe.
    fn next(&mut self, keyframe: bool) -> (bool, Vec<Bytes>) {
        let size = |sizes: &FrameSizes| {
            if keyframe {
                sizes.keyframe_bytes
            } else {
                sizes.interframe_bytes
            }
        };
        match self {
            VideoFrames::Vp8 { packetizer, sizes } => (
                keyframe,
                packetizer.packetize(&packetizer.frame_data(keyframe, size(sizes))),
            ),
            VideoFrames::H264 { packetizer, sizes } => (
                keyframe,
                packetizer.packetize(&packetizer.frame_nals(keyframe, size(sizes))),
            ),
            VideoFrames::Ivf {
                packetizer,
                frames,
                next,
            } => {
                let (keyframe, frame) = &frames[*next % frames.len()];
                *next = (*next + 1) % frames.len();
                (*keyframe, packetizer.packetize(frame))
            }
        }
    }
}

/// Where an audio stream's packets come from.
enum AudioPackets {
    Silence(Bytes),
    File { packets: Arc<Vec<Bytes>>, next: usize },
}

impl AudioPackets {
    fn next(&mut self) -> Bytes {
        match self {
            AudioPackets::Silence(payload) => payload.clone(),
            AudioPackets::File { packets, next } => {
                let packet = packets[*next % packets.len()].clone();
                *next = (*next + 1) % packets.len();
                packet
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_video(
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: SenderPayloadType,
    stamp: Option<RidStamp>,
    mut frames: VideoFrames,
    options: PublishOptions,
    keyframe_requests: Arc<AtomicU64>,
    counters: Arc<PublishCounters>,
) {
    let Some(payload_type) = payload_type.resolve().await else {
        tracing::warn!("the answer did not accept VP8; no video is sent");
        return;
    };
    let frame_period = Duration::from_secs(1) / options.frame_rate;
    let ticks_per_frame = VP8_CLOCK_RATE / options.frame_rate;
    let mut sequence_number: u16 = rand::random();
    let timestamp_base: u32 = rand::random();
    let mut seen_requests = 0u64;
    let mut last_keyframe: Option<Instant> = None;
    let mut frames_since_keyframe = 0u32;
    let started = Instant::now();
    let mut tick = tokio::time::interval(frame_period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = Instant::now();
        // The timestamp follows the wall clock, so skipped ticks show as a longer frame.
        let frame_index = (now.duration_since(started).as_micros() / frame_period.as_micros().max(1)) as u32;
        let timestamp = timestamp_base.wrapping_add(frame_index.wrapping_mul(ticks_per_frame));
        let requests = keyframe_requests.load(Ordering::Relaxed);
        let requested = requests != seen_requests
            && last_keyframe.is_none_or(|at| now.duration_since(at) >= FORCED_KEYFRAME_INTERVAL);
        if requests != seen_requests {
            counters.keyframe_requests.store(requests, Ordering::Relaxed);
        }
        let wanted =
            last_keyframe.is_none() || requested || frames_since_keyframe + 1 >= options.keyframe_interval_frames;
        let (keyframe, payloads) = frames.next(wanted);
        if keyframe || (wanted && frames.is_file()) {
            seen_requests = requests;
        }
        if keyframe {
            last_keyframe = Some(now);
            frames_since_keyframe = 0;
        } else {
            frames_since_keyframe += 1;
        }
        let last = payloads.len() - 1;
        for (index, payload) in payloads.into_iter().enumerate() {
            let bytes = payload.len() as u64;
            let mut header = rtp::header::Header {
                version: 2,
                marker: index == last,
                payload_type,
                sequence_number,
                timestamp,
                ssrc,
                ..Default::default()
            };
            if let Some(stamp) = &stamp {
                for (id, value) in stamp.mid.iter().chain(std::iter::once(&stamp.rid)) {
                    // Ids come from the negotiation (1..=14) and values are short: cannot fail.
                    let _ = header.set_extension(*id, value.clone());
                }
            }
            let packet = rtp::Packet { header, payload };
            sequence_number = sequence_number.wrapping_add(1);
            if track.write_rtp(packet).await.is_ok() {
                counters.video_packets.fetch_add(1, Ordering::Relaxed);
                counters.video_bytes.fetch_add(bytes, Ordering::Relaxed);
            } else {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        counters.video_frames.fetch_add(1, Ordering::Relaxed);
        if keyframe {
            counters.keyframes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn send_audio(
    track: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: SenderPayloadType,
    mut packets: AudioPackets,
    counters: Arc<PublishCounters>,
) {
    let Some(payload_type) = payload_type.resolve().await else {
        tracing::warn!("the answer did not accept Opus; no audio is sent");
        return;
    };
    let period = Duration::from_millis(u64::from(OPUS_PACKET_DURATION_MS));
    let ticks_per_packet = OPUS_CLOCK_RATE / 1_000 * OPUS_PACKET_DURATION_MS;
    let mut sequence_number: u16 = rand::random();
    let timestamp_base: u32 = rand::random();
    let started = Instant::now();
    let mut first = true;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let index = (started.elapsed().as_millis() / u128::from(OPUS_PACKET_DURATION_MS)) as u32;
        let payload = packets.next();
        let bytes = payload.len() as u64;
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                // Marker on the first packet of a talk spurt (RFC 7587 §4.2).
                marker: first,
                payload_type,
                sequence_number,
                timestamp: timestamp_base.wrapping_add(index.wrapping_mul(ticks_per_packet)),
                ssrc,
                ..Default::default()
            },
            payload,
        };
        first = false;
        sequence_number = sequence_number.wrapping_add(1);
        if track.write_rtp(packet).await.is_ok() {
            counters.audio_packets.fetch_add(1, Ordering::Relaxed);
            counters.audio_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
