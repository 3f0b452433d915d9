//! WHEP playback: receives the room's video and audio and keeps per-track statistics (see
//! [`crate::stats`]). Nothing is decoded; VP8 keyframes are recognised from the payload header.

use crate::codecs;
use crate::error::Error;
use crate::media::{h264_keyframe_start, vp8_keyframe_size, vp8_keyframe_start};
use crate::peer::{self, ConnectOptions, PeerEvents, SessionCore, Signaling};
use crate::signal;
use crate::stats::{PacketInfo, ReceiveStats, TrackStats};
use parking_lot::Mutex;
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::{configure_nack, configure_rtcp_reports};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

/// Without a whole keyframe this long after the first video packet, ask for one (PLI), and
/// again at this interval until one arrives.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(1_000);

/// A simulcast layer to ask the server for (`?layer=` of WHEP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Low,
    Mid,
    High,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Low => "low",
            Layer::Mid => "mid",
            Layer::High => "high",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlayOptions {
    /// Preferred simulcast layer; the server chooses when `None`.
    pub layer: Option<Layer>,
    pub video: bool,
    pub audio: bool,
    /// Negotiate NACK and ask for retransmissions of lost video packets. Off, loss is the
    /// raw loss on the path; on, what is left after repair.
    pub nack: bool,
    pub connect: ConnectOptions,
}

impl Default for PlayOptions {
    fn default() -> Self {
        Self {
            layer: None,
            video: true,
            audio: true,
            nack: true,
            connect: ConnectOptions::default(),
        }
    }
}

/// Statistics of a playback session.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlayStats {
    pub video: TrackStats,
    pub audio: TrackStats,
    /// From the start of [`play`] (before the POST) to the connected state.
    pub connect_latency: Option<Duration>,
    /// From the start of [`play`] to the first whole video keyframe.
    pub first_frame_latency: Option<Duration>,
}

struct Shared {
    started: Instant,
    connected_at: Mutex<Option<Instant>>,
    video: Mutex<ReceiveStats>,
    audio: Mutex<ReceiveStats>,
    /// Connections made so far: each numbers itself with the next value.
    connections: std::sync::atomic::AtomicU64,
    /// The connection whose packets count now, per kind (video, audio). A newer connection
    /// takes over with its first packet; an older one, still open while a move completes
    /// (make-before-break), stops counting then.
    counting: [std::sync::atomic::AtomicU64; 2],
}

/// A live WHEP session; its statistics grow until [`PlaySession::close`].
pub struct PlaySession {
    core: SessionCore,
    shared: Arc<Shared>,
}

impl PlaySession {
    pub fn location(&self) -> &str {
        self.core.location()
    }

    pub fn state(&self) -> RTCPeerConnectionState {
        self.core.state()
    }

    pub fn stats(&self) -> PlayStats {
        self.shared.stats()
    }

    /// Waits until a whole video keyframe has arrived.
    pub async fn wait_first_frame(&self, timeout: Duration) -> Result<Duration, Error> {
        let failed = || {
            matches!(
                self.state(),
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            )
        };
        PlayShared(Arc::clone(&self.shared))
            .wait_first_frame(timeout, failed)
            .await
    }

    /// DELETEs the session and closes the connection.
    pub async fn close(mut self) -> Result<(), Error> {
        self.core.close().await
    }
}

/// Plays the WHEP endpoint `url` (e.g. `http://127.0.0.1:8080/whep/room`). Returns once the
/// connection is up; media statistics accumulate from then on.
pub async fn play(url: &str, token: &str, options: PlayOptions) -> Result<PlaySession, Error> {
    if !options.video && !options.audio {
        return Err(Error::WebRtc("nothing to play: video and audio are both off".into()));
    }
    let mut url = signal::parse_url(url)?;
    if let Some(layer) = options.layer {
        url.query_pairs_mut().append_pair("layer", layer.as_str());
    }
    let http = options.connect.http.clone().unwrap_or_else(signal::default_http_client);
    let signaling = Signaling::Http {
        http,
        url,
        token: token.to_string(),
    };
    play_over(signaling, options, PlayShared::new()).await
}

/// Statistics that outlive one connection: a viewer that reconnects keeps counting into them.
#[derive(Clone)]
pub struct PlayShared(Arc<Shared>);

impl PlayShared {
    pub fn new() -> Self {
        PlayShared(Arc::new(Shared {
            started: Instant::now(),
            connected_at: Mutex::new(None),
            video: Mutex::new(ReceiveStats::new(true)),
            audio: Mutex::new(ReceiveStats::new(false)),
            connections: Default::default(),
            counting: Default::default(),
        }))
    }

    pub fn stats(&self) -> PlayStats {
        self.0.stats()
    }

    /// Waits (up to `timeout`) until the newest connection's video counts, i.e. its first
    /// packet arrived; an older connection may close then without a gap.
    pub(crate) async fn wait_newest_counting(&self, timeout: Duration) {
        use std::sync::atomic::Ordering;
        let deadline = tokio::time::Instant::now() + timeout;
        let newest = self.0.connections.load(Ordering::Acquire);
        while self.0.counting[1].load(Ordering::Acquire) < newest && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a whole video keyframe has arrived, or `failed` says it never will.
    pub(crate) async fn wait_first_frame(
        &self,
        timeout: Duration,
        failed: impl Fn() -> bool,
    ) -> Result<Duration, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(latency) = self.stats().first_frame_latency {
                return Ok(latency);
            }
            if failed() {
                return Err(Error::ConnectionFailed);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "the first video frame",
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Default for PlayShared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    fn stats(&self) -> PlayStats {
        let video = self.video.lock().snapshot();
        let audio = self.audio.lock().snapshot();
        let since_start = |at: Option<Instant>| at.map(|at| at.saturating_duration_since(self.started));
        PlayStats {
            video,
            audio,
            connect_latency: since_start(*self.connected_at.lock()),
            first_frame_latency: since_start(video.first_keyframe_at),
        }
    }
}

/// Plays with the offer sent through `signaling`, counting into `shared`.
pub(crate) async fn play_over(
    signaling: Signaling,
    options: PlayOptions,
    shared: PlayShared,
) -> Result<PlaySession, Error> {
    // This connection's packets count from its first one on (see `Shared::counting`).
    let shared = shared.0;
    let connection = shared.connections.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;

    let mut media_engine = codecs::media_engine(options.nack)?;
    let mut registry = Registry::new();
    if options.nack {
        registry = configure_nack(registry, &mut media_engine);
    }
    registry = configure_rtcp_reports(registry);
    let (events, mut watch) = PeerEvents::new();
    let mut remote_tracks = events.take_tracks();
    let pc = peer::build_peer(options.connect.bind_ip, media_engine, registry, events).await?;
    let receive_only = || {
        Some(RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            ..Default::default()
        })
    };
    if options.video {
        pc.add_transceiver_from_kind(RtpCodecKind::Video, receive_only())
            .await?;
    }
    if options.audio {
        pc.add_transceiver_from_kind(RtpCodecKind::Audio, receive_only())
            .await?;
    }
    // Tracks may open before the connected state is reported: start reading right away.
    let reader = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut readers = Vec::new();
            while let Some(track) = remote_tracks.recv().await {
                readers.push(AbortOnDrop(tokio::spawn(read_track(
                    track,
                    Arc::clone(&shared),
                    connection,
                ))));
            }
            // Keep the readers alive until this task is aborted or the connection ends.
            std::future::pending::<()>().await;
            drop(readers);
        })
    };
    let teardown = match peer::negotiate(&pc, &mut watch, &signaling, &options.connect).await {
        Ok(teardown) => teardown,
        Err(error) => {
            reader.abort();
            return Err(error);
        }
    };
    let core = SessionCore::new(pc, teardown, &options.connect, &watch, vec![reader]);
    // On failure `core` is dropped, which ends the server's session too.
    peer::wait_connected(&mut watch.state, options.connect.connect_timeout).await?;
    shared.connected_at.lock().get_or_insert_with(Instant::now);
    Ok(PlaySession { core, shared })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads one remote track until it ends, feeding its statistics; asks for a keyframe while
/// none has arrived whole.
async fn read_track(track: Arc<dyn TrackRemote>, shared: Arc<Shared>, connection: u64) {
    use std::sync::atomic::Ordering;
    let video = track.kind().await == RtpCodecKind::Video;
    let stats = if video { &shared.video } else { &shared.audio };
    let counting = &shared.counting[usize::from(video)];
    let mut media_ssrc: Option<u32> = None;
    let (pli_due_tx, mut pli_due) = mpsc::channel::<()>(1);
    let mut pli_timer: Option<tokio::task::JoinHandle<()>> = None;
    let mut have_keyframe = false;
    let mut h264 = false;
    loop {
        tokio::select! {
            event = track.poll() => {
                let Some(event) = event else { break };
                match event {
                    TrackRemoteEvent::OnOpen(init) => {
                        let mime = track.codec(init.ssrc).await.map(|c| c.mime_type).unwrap_or_default();
                        h264 = mime.eq_ignore_ascii_case("video/H264");
                    }
                    TrackRemoteEvent::OnRtpPacket(packet) => {
                        let now = Instant::now();
                        let header = &packet.header;
                        let keyframe_start = video
                            && if h264 {
                                h264_keyframe_start(&packet.payload)
                            } else {
                                vp8_keyframe_start(&packet.payload)
                            };
                        let info = PacketInfo {
                            sequence_number: header.sequence_number,
                            timestamp: header.timestamp,
                            marker: header.marker,
                            keyframe_start,
                            keyframe_size: (keyframe_start && !h264).then(|| vp8_keyframe_size(&packet.payload)).flatten(),
                            payload_bytes: packet.payload.len(),
                        };
                        let mut guard = stats.lock();
                        let current = counting.load(Ordering::Acquire);
                        if connection < current {
                            continue; // an older connection, superseded by a newer one
                        }
                        if connection > current {
                            // A new connection numbers its packets afresh.
                            counting.store(connection, Ordering::Release);
                            guard.restart();
                        }
                        guard.on_packet(info, now);
                        if video && !have_keyframe {
                            have_keyframe = guard.snapshot().first_keyframe_at.is_some();
                        }
                        drop(guard);
                        if video && media_ssrc.is_none() {
                            media_ssrc = Some(header.ssrc);
                            // First packet: arm the keyframe-request timer.
                            let tx = pli_due_tx.clone();
                            pli_timer = Some(tokio::spawn(async move {
                                loop {
                                    tokio::time::sleep(KEYFRAME_REQUEST_INTERVAL).await;
                                    if tx.send(()).await.is_err() {
                                        break;
                                    }
                                }
                            }));
                        }
                        if have_keyframe && let Some(timer) = pli_timer.take() {
                            timer.abort();
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
            Some(()) = pli_due.recv() => {
                if let (false, Some(ssrc)) = (have_keyframe, media_ssrc) {
                    let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: ssrc };
                    let _ = track.write_rtcp(vec![Box::new(pli)]).await;
                }
            }
        }
    }
    if let Some(timer) = pli_timer {
        timer.abort();
    }
}
