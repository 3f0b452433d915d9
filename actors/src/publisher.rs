//! The Publisher actor: one WHIP session. It owns the peer connection; each remote track gets a
//! reader task that feeds a [`PublishedTrack`] (the media plane) and tells the room about it.

use crate::ids::SessionId;
use crate::media::codec::Codec;
use crate::media::engine::PeerRole;
use crate::media::feedback::FeedbackState;
use crate::media::track::{MediaCounters, PublishedTrack, order_rids};
use crate::peer::{self, PeerEvents, PeerSession};
use crate::registry::{NodeStats, RoomContext, SessionPermit};
use crate::room::{Room, RoomError, RoomEvent, SessionAnswer};
use crate::sdp;
use actix::prelude::*;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCSessionDescription;

/// Keyframe requests queued per track before more are dropped (they are idempotent).
const KEYFRAME_QUEUE_MAX: usize = 16;
/// How long a reader waits for the room to accept a new track.
const ROOM_SEND_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Publisher {
    stats: Arc<NodeStats>,
    session: PeerSession,
}

peer::session_actor!(Publisher, publishers);

impl Publisher {
    /// Negotiates a WHIP offer and starts the session's actor.
    pub async fn negotiate(
        context: Arc<RoomContext>,
        room: Addr<Room>,
        offer: String,
        permit: SessionPermit,
    ) -> Result<(Publisher, SessionAnswer), RoomError> {
        sdp::validate_offer(&offer).map_err(RoomError::BadOffer)?;
        // `offered_codecs` keeps only the codecs the media plane forwards.
        if sdp::offered_codecs(&offer).is_empty() {
            return Err(RoomError::BadOffer(
                "no supported codec offered (Opus, VP8, VP9, H264, AV1)".into(),
            ));
        }
        let session = SessionId::generate();
        let rids = order_rids(sdp::video_send_rids(&offer));
        let (events, mut gathered) = PeerEvents::new(session.clone(), room.clone(), Arc::clone(&context.stats));
        {
            let room = room.clone();
            let session = session.clone();
            let counters = Arc::clone(&context.counters);
            events.set_on_track(Box::new(move |track| {
                tokio::spawn(read_track(
                    track,
                    rids.clone(),
                    room.clone(),
                    session.clone(),
                    Arc::clone(&counters),
                ));
            }));
        }
        let (pc, lease) = context
            .factory
            .build(
                PeerRole::Publisher,
                &offer,
                events.clone(),
                Arc::new(FeedbackState::default()),
            )
            .await
            .map_err(RoomError::Media)?;
        let description = RTCSessionDescription::offer(offer).map_err(|e| RoomError::BadOffer(e.to_string()))?;
        let negotiated = async {
            pc.set_remote_description(description)
                .await
                .map_err(|e| RoomError::BadOffer(e.to_string()))?;
            let answer = pc
                .create_answer(None)
                .await
                .map_err(|e| RoomError::BadOffer(e.to_string()))?;
            pc.set_local_description(answer).await.map_err(peer::media_error)?;
            let timeout = context.factory.config().gathering_timeout;
            peer::wait_gathered(&mut gathered, timeout).await?;
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
        let etag = peer::etag_of(&answer.sdp);
        context
            .stats
            .publishers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let actor = Publisher {
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
                tasks: Vec::new(),
            },
        };
        Ok((
            actor,
            SessionAnswer {
                session,
                sdp: answer.sdp,
                etag,
            },
        ))
    }
}

/// Reads one remote track until it ends: creates its [`PublishedTrack`] on the first opened
/// stream, maps simulcast SSRCs to layers, feeds packets, and sends keyframe requests upstream.
async fn read_track(
    track: Arc<dyn TrackRemote>,
    rids: Vec<String>,
    room: Addr<Room>,
    session: SessionId,
    counters: Arc<MediaCounters>,
) {
    let (keyframe_tx, mut keyframe_rx) = mpsc::channel::<u32>(KEYFRAME_QUEUE_MAX);
    let mut keyframe_tx = Some(keyframe_tx);
    let mut published: Option<Arc<PublishedTrack>> = None;
    // (ssrc, layer) of the streams opened so far: at most three, a Vec beats a map.
    let mut layers: Vec<(u32, u8)> = Vec::new();
    loop {
        tokio::select! {
            event = track.poll() => {
                let Some(event) = event else { break };
                match event {
                    TrackRemoteEvent::OnOpen(init) => {
                        let ssrc = init.ssrc;
                        if published.is_none() {
                            let Some(codec_params) = track.codec(ssrc).await else { continue };
                            let Some(codec) = Codec::from_mime(&codec_params.mime_type) else {
                                tracing::warn!(mime = %codec_params.mime_type, "publisher track with an unsupported codec ignored");
                                continue;
                            };
                            let Some(tx) = keyframe_tx.take() else { continue };
                            let track_rids = if codec.is_video() { rids.clone() } else { Vec::new() };
                            let created = Arc::new(PublishedTrack::new(
                                track.track_id().await.to_string(),
                                codec,
                                codec_params.sdp_fmtp_line.clone(),
                                codec_params.channels,
                                track_rids,
                                tx,
                                Arc::clone(&counters),
                            ));
                            let event = RoomEvent::TrackPublished { session: session.clone(), track: Arc::clone(&created) };
                            if tokio::time::timeout(ROOM_SEND_TIMEOUT, room.send(event)).await.is_err() {
                                tracing::warn!("room did not accept a published track in time");
                            }
                            published = Some(created);
                        }
                        if let Some(published) = &published
                            && let Some(layer) = published.layer_of_rid(init.rid.as_deref())
                        {
                            layers.retain(|(s, l)| *s != ssrc && *l != layer);
                            layers.push((ssrc, layer));
                            published.set_layer_ssrc(layer, ssrc);
                            published.request_keyframe(layer, Instant::now());
                        }
                    }
                    TrackRemoteEvent::OnRtpPacket(packet) => {
                        let Some(published) = &published else { continue };
                        let ssrc = packet.header.ssrc;
                        let Some(&(_, layer)) = layers.iter().find(|(s, _)| *s == ssrc) else { continue };
                        if packet.payload.is_empty() {
                            continue; // padding-only probe
                        }
                        published.ingest(layer, packet, Instant::now());
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
            Some(ssrc) = keyframe_rx.recv() => {
                let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: ssrc };
                if track.write_rtcp(vec![Box::new(pli)]).await.is_err() {
                    tracing::debug!("keyframe request could not be sent");
                }
            }
        }
    }
    if let Some(published) = published {
        let event = RoomEvent::TrackUnpublished {
            session,
            track: published,
        };
        let _ = tokio::time::timeout(ROOM_SEND_TIMEOUT, room.send(event)).await;
    }
}
