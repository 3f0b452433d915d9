//! What publishing and playing share: building a loopback-capable peer connection, its event
//! handler, non-trickle negotiation over WHIP/WHEP or a signal channel, and closing.

use crate::error::Error;
use crate::signal;
use parking_lot::Mutex;
use reqwest::{Client, Url};
use rtc::interceptor::Registry;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};
use webrtc::runtime::TokioRuntime;

/// Settings both kinds of session take.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Local address the connection's UDP socket binds to and announces. Loopback by default:
    /// benchmark and test traffic never leaves the machine.
    pub bind_ip: IpAddr,
    /// Upper bound on ICE gathering before the offer is sent.
    pub gathering_timeout: Duration,
    /// Upper bound on each HTTP request.
    pub http_timeout: Duration,
    /// Upper bound on reaching the connected state after the answer is applied.
    pub connect_timeout: Duration,
    /// HTTP client to use; a shared process-wide one when `None`.
    pub http: Option<Client>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            gathering_timeout: Duration::from_secs(5),
            http_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(15),
            http: None,
        }
    }
}

/// The connection's event handler: flips watch channels, hands remote tracks to the session.
pub(crate) struct PeerEvents {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: Mutex<Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>>,
}

pub(crate) struct PeerWatch {
    pub gathered: watch::Receiver<bool>,
    pub state: watch::Receiver<RTCPeerConnectionState>,
}

impl PeerEvents {
    pub fn new() -> (Arc<Self>, PeerWatch) {
        let (gathered, gathered_rx) = watch::channel(false);
        let (state, state_rx) = watch::channel(RTCPeerConnectionState::New);
        let events = Arc::new(Self {
            gathered,
            state,
            tracks: Mutex::new(None),
        });
        (
            events,
            PeerWatch {
                gathered: gathered_rx,
                state: state_rx,
            },
        )
    }

    /// Remote tracks will be sent to the returned receiver.
    pub fn take_tracks(&self) -> mpsc::UnboundedReceiver<Arc<dyn TrackRemote>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tracks.lock() = Some(tx);
        rx
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
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(tx) = self.tracks.lock().as_ref() {
            let _ = tx.send(track);
        }
    }
}

pub(crate) async fn build_peer(
    bind_ip: IpAddr,
    media_engine: MediaEngine,
    registry: Registry,
    events: Arc<PeerEvents>,
) -> Result<Arc<dyn PeerConnection>, Error> {
    let mut settings = SettingEngineBuilder::new();
    if bind_ip.is_loopback() {
        settings = settings.with_include_loopback_candidate(true);
    }
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(settings.build())
        .with_interceptor_registry(registry)
        .with_handler(events)
        .with_runtime(Arc::new(TokioRuntime))
        .with_udp_addrs(vec![SocketAddr::new(bind_ip, 0)])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// Where an offer goes: WHIP/WHEP over HTTP, or a signal channel.
pub(crate) enum Signaling {
    Http { http: Client, url: Url, token: String },
    Channel(crate::channel::OfferSink),
}

/// How a negotiated session is ended on the server.
pub(crate) enum Teardown {
    /// DELETE the session resource.
    Http { http: Client, location: Url, token: String },
    /// The signal channel ends it (on leave, or when the channel closes).
    Channel,
}

impl Teardown {
    pub async fn run(&self, timeout: Duration) -> Result<(), Error> {
        match self {
            Teardown::Http { http, location, token } => signal::delete(http, location, token, timeout).await,
            Teardown::Channel => Ok(()),
        }
    }
}

/// Offers, waits for every candidate (no trickle), sends the offer, applies the answer. Closes
/// the connection on failure.
pub(crate) async fn negotiate(
    pc: &Arc<dyn PeerConnection>,
    watch: &mut PeerWatch,
    signaling: &Signaling,
    options: &ConnectOptions,
) -> Result<Teardown, Error> {
    let result = async {
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        // Reduced to a plain value at once: the watch guard must not live across an await.
        let gathered = tokio::time::timeout(options.gathering_timeout, watch.gathered.wait_for(|done| *done))
            .await
            .map(|waited| waited.is_ok());
        match gathered {
            Ok(true) => {}
            Ok(false) => return Err(Error::ConnectionFailed),
            Err(_) => {
                return Err(Error::Timeout {
                    what: "ICE gathering",
                    after: options.gathering_timeout,
                });
            }
        }
        let local = pc
            .local_description()
            .await
            .ok_or_else(|| Error::WebRtc("no local description after gathering".into()))?;
        let (answer_sdp, teardown) = match signaling {
            Signaling::Http { http, url, token } => {
                let created = signal::post_offer(http, url, token, local.sdp, options.http_timeout).await?;
                let teardown = Teardown::Http {
                    http: http.clone(),
                    location: created.location,
                    token: token.clone(),
                };
                (created.answer_sdp, teardown)
            }
            Signaling::Channel(sink) => (sink.exchange(local.sdp).await?, Teardown::Channel),
        };
        let answer = RTCSessionDescription::answer(answer_sdp).map_err(|e| Error::BadAnswer(e.to_string()))?;
        if let Err(error) = pc.set_remote_description(answer).await {
            // The server holds a session we cannot use: end it.
            let _ = teardown.run(options.http_timeout).await;
            return Err(Error::BadAnswer(error.to_string()));
        }
        Ok(teardown)
    }
    .await;
    if result.is_err() {
        let _ = pc.close().await;
    }
    result
}

/// Waits for the connected state; `Err` when it fails or closes first, or on timeout.
pub(crate) async fn wait_connected(
    state: &mut watch::Receiver<RTCPeerConnectionState>,
    timeout: Duration,
) -> Result<(), Error> {
    let reached = tokio::time::timeout(
        timeout,
        state.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Connected | RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            )
        }),
    )
    .await
    .map(|waited| waited.map(|state| *state));
    match reached {
        Ok(Ok(RTCPeerConnectionState::Connected)) => Ok(()),
        Ok(_) => Err(Error::ConnectionFailed),
        Err(_) => Err(Error::Timeout {
            what: "the connected state",
            after: timeout,
        }),
    }
}

/// Tasks and connection of a live session; `Drop` stops the tasks and closes the connection
/// without waiting, `close` does it in order and ends the server's session.
pub(crate) struct SessionCore {
    pub pc: Arc<dyn PeerConnection>,
    pub teardown: Teardown,
    pub http_timeout: Duration,
    pub state: watch::Receiver<RTCPeerConnectionState>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub closed: bool,
}

impl SessionCore {
    /// The session of a negotiated connection; `tasks` end with it.
    pub fn new(
        pc: Arc<dyn PeerConnection>,
        teardown: Teardown,
        options: &ConnectOptions,
        watch: &PeerWatch,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        SessionCore {
            pc,
            teardown,
            http_timeout: options.http_timeout,
            state: watch.state.clone(),
            tasks,
            closed: false,
        }
    }

    /// The WHIP/WHEP session resource; empty for a session made over a signal channel.
    pub fn location(&self) -> &str {
        match &self.teardown {
            Teardown::Http { location, .. } => location.as_str(),
            Teardown::Channel => "",
        }
    }

    pub fn state(&self) -> RTCPeerConnectionState {
        *self.state.borrow()
    }

    pub async fn close(&mut self) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let ended = self.teardown.run(self.http_timeout).await;
        let closed = self.pc.close().await;
        ended?;
        closed.map_err(Error::from)
    }
}

impl Drop for SessionCore {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Best effort: without a runtime there is nothing to run the close on; the server
        // ends the session when ICE consent expires.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pc = Arc::clone(&self.pc);
            let teardown = std::mem::replace(&mut self.teardown, Teardown::Channel);
            let timeout = self.http_timeout;
            handle.spawn(async move {
                let _ = teardown.run(timeout).await;
                let _ = pc.close().await;
            });
        }
    }
}
