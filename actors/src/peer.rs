//! What a publisher and a subscriber session have in common: the peer connection's event
//! handler, the connection gauge, trickle ICE and ICE restart (WHIP/WHEP PATCH), and closing.

use crate::ids::SessionId;
use crate::media::engine::{MediaError, PortLease};
use crate::registry::{NodeStats, SessionPermit};
use crate::room::{Room, RoomError, RoomEvent};
use crate::sdp;
use actix::Addr;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription,
};

/// Called with each remote track of a publisher's connection.
pub type TrackCallback = Box<dyn Fn(Arc<dyn TrackRemote>) + Send + Sync>;

/// The event handler given to a peer connection. It only flips flags and forwards control
/// events to the room; media is handled by the tasks `on_track` starts.
pub struct PeerEvents {
    pub session: SessionId,
    room: Addr<Room>,
    stats: Arc<NodeStats>,
    gathered: watch::Sender<bool>,
    /// True once the connection has reached `connected` (ICE and DTLS done).
    connected: watch::Sender<bool>,
    connected_counted: AtomicBool,
    closed_reported: AtomicBool,
    on_track: Mutex<Option<TrackCallback>>,
}

impl PeerEvents {
    pub fn new(session: SessionId, room: Addr<Room>, stats: Arc<NodeStats>) -> (Arc<Self>, watch::Receiver<bool>) {
        let (gathered, gathered_rx) = watch::channel(false);
        let events = Arc::new(Self {
            session,
            room,
            stats,
            gathered,
            connected: watch::channel(false).0,
            connected_counted: AtomicBool::new(false),
            closed_reported: AtomicBool::new(false),
            on_track: Mutex::new(None),
        });
        (events, gathered_rx)
    }

    pub fn set_on_track(&self, callback: TrackCallback) {
        *self.on_track.lock() = Some(callback);
    }

    pub fn is_connected(&self) -> bool {
        self.connected_counted.load(Ordering::Acquire)
    }

    /// Becomes true when the connection is up; media sent before that is lost on the wire.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Removes this connection from the active-connections gauge, once.
    pub fn mark_gone(&self) {
        if self.connected_counted.swap(false, Ordering::AcqRel) {
            self.stats.active_connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn report_closed(&self) {
        if self.closed_reported.swap(true, Ordering::AcqRel) {
            return;
        }
        let room = self.room.clone();
        let session = self.session.clone();
        // Must be delivered: `send` waits for mailbox room instead of dropping.
        tokio::spawn(async move {
            let _ = room.send(RoomEvent::SessionClosed { session }).await;
        });
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PeerEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        match state {
            RTCPeerConnectionState::Connected => {
                if !self.connected_counted.swap(true, Ordering::AcqRel) {
                    self.stats.active_connections.fetch_add(1, Ordering::Relaxed);
                }
                self.connected.send_replace(true);
            }
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                self.mark_gone();
                self.report_closed();
            }
            _ => {}
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(callback) = self.on_track.lock().as_ref() {
            callback(track);
        }
    }
}

/// The resources of one negotiated connection, released when the session's actor stops.
pub struct PeerSession {
    pub session: SessionId,
    pub pc: Arc<dyn PeerConnection>,
    pub events: Arc<PeerEvents>,
    pub etag: String,
    pub gathered: watch::Receiver<bool>,
    pub gathering_timeout: Duration,
    pub _lease: PortLease,
    pub _permit: SessionPermit,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Mailbox bound of a session actor: it only receives PATCH requests and stops.
pub const SESSION_MAILBOX_MAX: usize = 16;

/// A WHIP/WHEP PATCH for a session; must be answered.
#[derive(actix::Message)]
#[rtype(result = "Result<PatchOutcome, RoomError>")]
pub struct PatchSession {
    pub fragment: String,
}

/// Ends a session; must be delivered (sent with `send`).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct StopSession;

/// The actor plumbing both session kinds share: a bounded mailbox, PATCH, stop, and closing
/// the connection (and leaving the `$gauge` of `NodeStats`) when the actor stops.
macro_rules! session_actor {
    ($actor:ty, $gauge:ident) => {
        impl actix::Actor for $actor {
            type Context = actix::Context<Self>;

            fn started(&mut self, ctx: &mut Self::Context) {
                ctx.set_mailbox_capacity($crate::peer::SESSION_MAILBOX_MAX);
            }

            fn stopped(&mut self, _ctx: &mut Self::Context) {
                self.session.close();
                self.stats
                    .$gauge
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }

        impl $actor {
            /// The connection's event handler, for the room to read the connection state.
            pub(crate) fn events(&self) -> std::sync::Arc<$crate::peer::PeerEvents> {
                std::sync::Arc::clone(&self.session.events)
            }
        }

        impl actix::Handler<$crate::peer::PatchSession> for $actor {
            type Result = actix::ResponseFuture<Result<$crate::peer::PatchOutcome, $crate::room::RoomError>>;

            fn handle(&mut self, msg: $crate::peer::PatchSession, _ctx: &mut Self::Context) -> Self::Result {
                Box::pin(self.session.patch(msg.fragment))
            }
        }

        impl actix::Handler<$crate::peer::StopSession> for $actor {
            type Result = ();

            fn handle(&mut self, _msg: $crate::peer::StopSession, ctx: &mut Self::Context) {
                actix::ActorContext::stop(ctx);
            }
        }
    };
}
pub(crate) use session_actor;

/// The reply to a PATCH: `None` for plain trickle (204), or the fragment answering an ICE
/// restart (200) with the new ETag.
pub struct PatchOutcome {
    pub restart_fragment: Option<String>,
    pub etag: String,
}

impl PeerSession {
    /// Applies a PATCH; the future owns what it needs, so the actor is free meanwhile.
    pub fn patch(&self, fragment: String) -> impl Future<Output = Result<PatchOutcome, RoomError>> + 'static {
        patch(
            Arc::clone(&self.pc),
            self.gathered.clone(),
            fragment,
            self.gathering_timeout,
        )
    }

    /// Closes the connection and stops its tasks; idempotent, never blocks the caller.
    pub fn close(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.events.mark_gone();
        let pc = Arc::clone(&self.pc);
        tokio::spawn(async move {
            let _ = pc.close().await;
        });
    }
}

impl Drop for PeerSession {
    fn drop(&mut self) {
        self.close();
    }
}

/// Applies a trickle-ICE fragment; a new ufrag means an ICE restart (RFC 9725 §4.4).
pub async fn patch(
    pc: Arc<dyn PeerConnection>,
    mut gathered: watch::Receiver<bool>,
    fragment: String,
    gathering_timeout: Duration,
) -> Result<PatchOutcome, RoomError> {
    let fragment = sdp::parse_fragment(&fragment).map_err(RoomError::BadFragment)?;
    let remote = pc
        .remote_description()
        .await
        .ok_or_else(|| RoomError::BadFragment("the session has no remote description".into()))?;
    let current_ufrag = sdp::ice_ufrag(&remote.sdp).map(str::to_string);
    let restart = matches!((&fragment.ice_ufrag, &current_ufrag), (Some(new), Some(old)) if new != old);
    if restart {
        let (Some(ufrag), Some(pwd)) = (&fragment.ice_ufrag, &fragment.ice_pwd) else {
            return Err(RoomError::BadFragment(
                "ICE restart needs a=ice-ufrag and a=ice-pwd".into(),
            ));
        };
        let offer_sdp = sdp::replace_ice_credentials(&remote.sdp, ufrag, pwd);
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| RoomError::BadFragment(e.to_string()))?;
        let _ = gathered.borrow_and_update();
        pc.set_remote_description(offer).await.map_err(media_error)?;
        let answer = pc.create_answer(None).await.map_err(media_error)?;
        pc.set_local_description(answer).await.map_err(media_error)?;
        wait_gathered(&mut gathered, gathering_timeout).await?;
        let local = pc
            .local_description()
            .await
            .ok_or_else(|| RoomError::Media(MediaError::Negotiation("no local description after restart".into())))?;
        for (mid, candidate) in fragment.candidates {
            add_candidate(&pc, mid, candidate).await?;
        }
        let etag = etag_of(&local.sdp);
        return Ok(PatchOutcome {
            restart_fragment: Some(sdp::restart_fragment(&local.sdp)),
            etag,
        });
    }
    for (mid, candidate) in fragment.candidates {
        add_candidate(&pc, mid, candidate).await?;
    }
    let local = pc
        .local_description()
        .await
        .map(|d| etag_of(&d.sdp))
        .unwrap_or_default();
    Ok(PatchOutcome {
        restart_fragment: None,
        etag: local,
    })
}

async fn add_candidate(pc: &Arc<dyn PeerConnection>, mid: Option<String>, candidate: String) -> Result<(), RoomError> {
    let init = RTCIceCandidateInit {
        candidate,
        sdp_mid: mid,
        sdp_mline_index: None,
        ..Default::default()
    };
    pc.add_ice_candidate(init)
        .await
        .map_err(|e| RoomError::BadFragment(format!("candidate refused: {e}")))
}

pub async fn wait_gathered(gathered: &mut watch::Receiver<bool>, timeout: Duration) -> Result<(), RoomError> {
    let wait = gathered.wait_for(|done| *done);
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(RoomError::Media(MediaError::Negotiation(
            "connection closed while gathering".into(),
        ))),
        Err(_) => Err(RoomError::Media(MediaError::GatheringTimeout(timeout))),
    }
}

/// The ETag of a session identifies its ICE session (RFC 9725 §4.3): our ICE ufrag.
pub fn etag_of(local_sdp: &str) -> String {
    format!("\"{}\"", sdp::ice_ufrag(local_sdp).unwrap_or("none"))
}

pub fn media_error(error: webrtc::error::Error) -> RoomError {
    RoomError::Media(MediaError::WebRtc(error.to_string()))
}
