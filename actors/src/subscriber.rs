//! The Subscriber actor: one WHEP session. It owns the peer connection and one forwarding task
//! per media slot (video, audio). The room binds each slot to a [`PublishedTrack`]; the task
//! drains its sink, chooses the simulcast layer and rewrites headers for this viewer.

use crate::ids::SessionId;
use crate::media::bwe::BandwidthEstimator;
use crate::media::codec::Codec;
use crate::media::engine::PeerRole;
use crate::media::feedback::FeedbackState;
use crate::media::layer::{LayerAction, LayerSelector};
use crate::media::rewrite::RtpRewriter;
use crate::media::track::{ForwardPacket, MediaCounters, MediaKind, PublishedTrack, Sink};
use crate::peer::{self, PeerEvents, PeerSession};
use crate::registry::{NodeStats, RoomContext, SessionPermit};
use crate::room::{Room, RoomError, SessionAnswer};
use crate::sdp;
use actix::prelude::*;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::RTCSessionDescription;
use webrtc::rtp_transceiver::RtpSender;

/// Control events queued per slot; the room sends few (binds on publish and unpublish).
const SLOT_CONTROL_QUEUE_MAX: usize = 32;
/// How often a slot re-evaluates its bandwidth estimate and layer.
const SLOT_TICK: Duration = Duration::from_millis(250);
/// Wait after the viewer's connection is up before the keyframe cache is replayed to it.
const REPLAY_GRACE: Duration = Duration::from_millis(50);

/// Tells a forwarding slot what to forward.
#[derive(Debug)]
pub enum SlotControl {
    Bind(Arc<PublishedTrack>),
    Unbind,
    SetLayer(Option<u8>),
}

/// The room's handle to a slot.
#[derive(Debug, Clone)]
pub struct SlotHandle {
    pub kind: MediaKind,
    pub codec: Codec,
    pub control: mpsc::Sender<SlotControl>,
    /// The track the room last bound it to, so it re-binds only on a change.
    pub bound: Option<Arc<PublishedTrack>>,
}

pub struct Subscriber {
    stats: Arc<NodeStats>,
    session: PeerSession,
}

peer::session_actor!(Subscriber, subscribers);

/// What the room knows about the tracks it will bind, to pick the slot codecs.
pub struct SubscribeRequest {
    pub offer: String,
    pub layer: Option<u8>,
    /// Codec and fmtp of the room's current video track, if any.
    pub video_source: Option<(Codec, String)>,
}

pub struct NegotiatedSubscriber {
    /// Not started yet: the room starts it on its own arbiter.
    pub subscriber: Subscriber,
    pub answer: SessionAnswer,
    pub slots: Vec<SlotHandle>,
}

impl Subscriber {
    pub async fn negotiate(
        context: Arc<RoomContext>,
        room: Addr<Room>,
        request: SubscribeRequest,
        permit: SessionPermit,
    ) -> Result<NegotiatedSubscriber, RoomError> {
        let offered_at = Instant::now();
        sdp::validate_offer(&request.offer).map_err(RoomError::BadOffer)?;
        let offered = sdp::offered_codecs(&request.offer);
        let video_codec = match &request.video_source {
            Some((codec, fmtp)) if offered.contains(codec) => Some((*codec, fmtp.clone())),
            _ => [Codec::Vp8, Codec::H264, Codec::Vp9, Codec::Av1]
                .into_iter()
                .find(|c| offered.contains(c))
                .map(|c| (c, default_fmtp(c))),
        };
        let audio_codec = offered
            .contains(&Codec::Opus)
            .then(|| (Codec::Opus, default_fmtp(Codec::Opus)));
        if video_codec.is_none() && audio_codec.is_none() {
            return Err(RoomError::BadOffer(
                "no supported codec offered (Opus, VP8, VP9, H264, AV1)".into(),
            ));
        }
        let session = SessionId::generate();
        let feedback = Arc::new(FeedbackState {
            rtt_seconds: Some(context.counters.histograms.rtt_seconds.clone()),
            ..FeedbackState::default()
        });
        let (events, mut gathered) = PeerEvents::new(session.clone(), room.clone(), Arc::clone(&context.stats));
        let (pc, lease) = context
            .factory
            .build(
                PeerRole::Subscriber,
                &request.offer,
                events.clone(),
                Arc::clone(&feedback),
            )
            .await
            .map_err(RoomError::Media)?;

        let mut locals = Vec::new();
        for (codec, fmtp) in [video_codec, audio_codec].into_iter().flatten() {
            let ssrc: u32 = rand::random();
            let kind = if codec.is_video() {
                RtpCodecKind::Video
            } else {
                RtpCodecKind::Audio
            };
            let rtp_codec = RTCRtpCodec {
                mime_type: codec.mime_type().to_string(),
                clock_rate: codec.clock_rate(),
                channels: if codec.is_video() { 0 } else { 2 },
                sdp_fmtp_line: fmtp,
                rtcp_feedback: vec![],
            };
            let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                format!("mediamesh-{}", session),
                format!("{}-{}", if codec.is_video() { "video" } else { "audio" }, ssrc),
                "mediamesh".to_string(),
                kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: rtp_codec,
                    ..Default::default()
                }],
            )));
            let sender = pc
                .add_track(Arc::clone(&local) as Arc<dyn TrackLocal>)
                .await
                .map_err(peer::media_error)?;
            locals.push((codec, ssrc, local, sender));
        }
        let negotiated = async {
            let description =
                RTCSessionDescription::offer(request.offer.clone()).map_err(|e| RoomError::BadOffer(e.to_string()))?;
            pc.set_remote_description(description)
                .await
                .map_err(|e| RoomError::BadOffer(e.to_string()))?;
            let answer = pc
                .create_answer(None)
                .await
                .map_err(|e| RoomError::BadOffer(e.to_string()))?;
            pc.set_local_description(answer).await.map_err(peer::media_error)?;
            peer::wait_gathered(&mut gathered, context.factory.config().gathering_timeout).await?;
            pc.local_description()
                .await
                .ok_or_else(|| RoomError::BadOffer("no answer could be made".into()))
        }
        .await;
        let answer = match negotiated {
            Ok(answer) => answer,
            Err(error) => {
                let _ = pc.close().await;
                return Err(error);
            }
        };

        let mut slots = Vec::new();
        let mut tasks = Vec::new();
        for (codec, ssrc, local, sender) in locals {
            let Some(payload_type) = negotiated_payload_type(&sender, codec).await else {
                continue; // the viewer did not accept this kind
            };
            let (control, control_rx) = mpsc::channel(SLOT_CONTROL_QUEUE_MAX);
            let slot = ForwardSlot {
                local,
                rewriter: RtpRewriter::new(ssrc, payload_type, codec.clock_rate()),
                preference: if codec.is_video() { request.layer } else { None },
                feedback: Arc::clone(&feedback),
                bwe: BandwidthEstimator::new(context.bwe),
                counters: Arc::clone(&context.counters),
                seen_loss_reports: 0,
                seen_remb_reports: 0,
                seen_keyframe_requests: 0,
                awaiting_first_frame: codec.is_video().then_some(offered_at),
            };
            tasks.push(tokio::spawn(slot.run(control_rx, events.connected())));
            slots.push(SlotHandle {
                kind: if codec.is_video() {
                    MediaKind::Video
                } else {
                    MediaKind::Audio
                },
                codec,
                control,
                bound: None,
            });
        }
        if slots.is_empty() {
            let _ = pc.close().await;
            return Err(RoomError::BadOffer("the offer accepts none of the room's media".into()));
        }
        let etag = peer::etag_of(&answer.sdp);
        context.stats.subscribers.fetch_add(1, Ordering::Relaxed);
        let actor = Subscriber {
            stats: Arc::clone(&context.stats),
            session: PeerSession {
                session: session.clone(),
                pc,
                events,
                etag: etag.clone(),
                gathered,
                gathering_timeout: context.factory.config().gathering_timeout,
                _lease: lease,
                _permit: permit,
                tasks,
            },
        };
        Ok(NegotiatedSubscriber {
            subscriber: actor,
            answer: SessionAnswer {
                session,
                sdp: answer.sdp,
                etag,
            },
            slots,
        })
    }
}

fn default_fmtp(codec: Codec) -> String {
    match codec {
        Codec::Opus => "minptime=10;useinbandfec=1".into(),
        Codec::H264 => "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
        Codec::Vp9 => "profile-id=0".into(),
        Codec::Vp8 | Codec::Av1 => String::new(),
    }
}

/// The payload type the viewer negotiated for `codec` on this sender (webrtc checks it on
/// every write since 0.20.3).
async fn negotiated_payload_type(sender: &Arc<dyn RtpSender>, codec: Codec) -> Option<u8> {
    let parameters = sender.get_parameters().await.ok()?;
    parameters
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| Codec::from_mime(&c.rtp_codec.mime_type) == Some(codec))
        .map(|c| c.payload_type)
}

/// One outgoing media slot of a subscriber and its forwarding loop.
struct ForwardSlot {
    local: Arc<TrackLocalStaticRTP>,
    rewriter: RtpRewriter,
    preference: Option<u8>,
    feedback: Arc<FeedbackState>,
    bwe: BandwidthEstimator,
    counters: Arc<MediaCounters>,
    seen_loss_reports: u64,
    seen_remb_reports: u64,
    seen_keyframe_requests: u64,
    /// When the viewer's offer came, until its first video keyframe is written.
    awaiting_first_frame: Option<Instant>,
}

struct Binding {
    track: Arc<PublishedTrack>,
    sink: Arc<Sink>,
    packets: mpsc::Receiver<ForwardPacket>,
    selector: LayerSelector,
}

impl ForwardSlot {
    async fn run(mut self, mut control: mpsc::Receiver<SlotControl>, mut connected: watch::Receiver<bool>) {
        // Binding replays the keyframe cache: hold it until the viewer's connection is up, or
        // the replayed GOP is lost on the wire and the first frame waits for the next keyframe.
        let mut pending: Option<Arc<PublishedTrack>> = None;
        loop {
            tokio::select! {
                up = connected.wait_for(|up| *up) => {
                    if up.is_err() {
                        return;
                    }
                    break;
                }
                command = control.recv() => match command {
                    None => return,
                    Some(SlotControl::Bind(track)) => pending = Some(track),
                    Some(SlotControl::Unbind) => pending = None,
                    Some(SlotControl::SetLayer(layer)) => self.preference = layer,
                },
            }
        }
        // "Connected" comes a moment before the sender's SRTP path is ready: packets written at
        // once are accepted and then lost, the replayed keyframe with them, and the viewer waits
        // for the next keyframe (measured: one viewer in four at 1.1-1.5 s instead of 0.2 s).
        tokio::time::sleep(REPLAY_GRACE).await;
        let mut binding: Option<Binding> = match pending {
            Some(track) => Some(self.bind(track).await),
            None => None,
        };
        let mut tick = tokio::time::interval(SLOT_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = control.recv() => {
                    let Some(command) = command else { break };
                    match command {
                        SlotControl::Bind(track) => {
                            if let Some(old) = binding.take() {
                                old.track.detach(&old.sink);
                            }
                            binding = Some(self.bind(track).await);
                        }
                        SlotControl::Unbind => {
                            if let Some(old) = binding.take() {
                                old.track.detach(&old.sink);
                            }
                        }
                        SlotControl::SetLayer(layer) => {
                            self.preference = layer;
                            if let Some(binding) = binding.as_mut() {
                                binding.selector.set_preference(layer);
                                self.evaluate(binding);
                            }
                        }
                    }
                }
                item = next_packet(&mut binding) => match item {
                    Some(item) => {
                        if let Some(binding) = binding.as_mut() {
                            self.forward(&mut binding.selector, item).await;
                        }
                    }
                    None => binding = None,
                },
                _ = tick.tick() => {
                    if let Some(binding) = binding.as_mut() {
                        self.evaluate(binding);
                    }
                }
            }
        }
        if let Some(old) = binding {
            old.track.detach(&old.sink);
        }
    }

    async fn bind(&mut self, track: Arc<PublishedTrack>) -> Binding {
        let mut selector = LayerSelector::new(self.preference);
        self.rewriter.restart();
        let now = Instant::now();
        let action = selector.evaluate(&track.layer_views(now), self.bwe.estimate_bps(now), now);
        let (sink, packets) = Sink::new(selector.wanted_mask());
        let replay = track.attach(Arc::clone(&sink), selector.target());
        if replay.is_empty()
            && let Some(LayerAction::RequestKeyframe(layer)) = action
        {
            track.request_keyframe(layer, now);
        }
        for item in replay {
            self.forward(&mut selector, item).await;
        }
        Binding {
            track,
            sink,
            packets,
            selector,
        }
    }

    /// Feeds the viewer's reports into the estimate, re-chooses the layer, and relays the
    /// viewer's own keyframe requests upstream.
    fn evaluate(&mut self, binding: &mut Binding) {
        let now = Instant::now();
        let loss_reports = self.feedback.loss_reports.load(Ordering::Relaxed);
        if loss_reports != self.seen_loss_reports {
            self.seen_loss_reports = loss_reports;
            let fraction = self.feedback.fraction_lost.load(Ordering::Relaxed).min(255) as u8;
            self.bwe.on_loss_report(fraction, now);
        }
        let remb_reports = self.feedback.remb_reports.load(Ordering::Relaxed);
        if remb_reports != self.seen_remb_reports {
            self.seen_remb_reports = remb_reports;
            self.bwe.on_remb(self.feedback.remb_bps.load(Ordering::Relaxed), now);
        }
        let views = binding.track.layer_views(now);
        if let Some(LayerAction::RequestKeyframe(layer)) =
            binding.selector.evaluate(&views, self.bwe.estimate_bps(now), now)
        {
            binding.track.request_keyframe(layer, now);
        }
        binding.sink.set_wanted_layers(binding.selector.wanted_mask());
        let keyframe_requests = self.feedback.keyframe_requests.load(Ordering::Relaxed);
        if keyframe_requests != self.seen_keyframe_requests {
            self.seen_keyframe_requests = keyframe_requests;
            if let Some(layer) = binding.selector.current() {
                binding.track.request_keyframe(layer, now);
            }
        }
    }

    async fn forward(&mut self, selector: &mut LayerSelector, item: ForwardPacket) {
        if !selector.accept(item.layer, item.keyframe_start) {
            return;
        }
        let now = Instant::now();
        let mut packet = item.packet;
        let header = &mut packet.header;
        if self.rewriter.is_new_source(header.ssrc) {
            self.rewriter
                .switch_source(header.ssrc, header.sequence_number, header.timestamp, now);
        }
        let out = self.rewriter.rewrite(header.sequence_number, header.timestamp, now);
        header.ssrc = out.ssrc;
        header.payload_type = out.payload_type;
        header.sequence_number = out.sequence_number;
        header.timestamp = out.timestamp;
        let bytes = packet.payload.len() as u64;
        if self.local.write_rtp(packet).await.is_ok() {
            self.counters.packets_forwarded.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_forwarded.fetch_add(bytes, Ordering::Relaxed);
            if item.keyframe_start
                && let Some(offered_at) = self.awaiting_first_frame.take()
            {
                let seconds = offered_at.elapsed().as_secs_f64();
                self.counters.histograms.first_frame_seconds.observe(seconds);
            }
        }
    }
}

async fn next_packet(binding: &mut Option<Binding>) -> Option<ForwardPacket> {
    match binding {
        Some(binding) => binding.packets.recv().await,
        None => std::future::pending().await,
    }
}
