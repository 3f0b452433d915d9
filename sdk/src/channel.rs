//! The signal channel: a session with a node over its WebSocket (`/signal`, JSON) or gRPC
//! (`Signal/Connect`) transport. [`Client::connect`] joins a room; publishing and playback run
//! over the channel with the same media code as WHIP/WHEP. When the channel drops, the client
//! reconnects with backoff, resumes with its resume token, and sets its media up again; a
//! `moved` message sends it to another node the same way.

use crate::error::Error;
use crate::peer::Signaling;
use crate::signal;
use crate::whep::{self, PlayOptions, PlaySession, PlayShared, PlayStats};
use crate::whip::{self, PublishCounters, PublishOptions, PublishSession, PublishStats};
use futures::{SinkExt, StreamExt};
use mediamesh_proto::signal::v1 as pb;
use mediamesh_proto::signal::v1::json;
use parking_lot::Mutex;
use pb::client_message::Body as In;
use pb::server_message::Body as Out;
use reqwest::Url;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_tungstenite::tungstenite;

/// Queue bounds: commands to the driver, and events to the application.
const COMMAND_QUEUE_MAX: usize = 64;
/// After a move, the old node's playback runs at most this long next to the new one's.
const MOVE_OVERLAP_MAX: Duration = Duration::from_secs(2);
/// `moved` replies to a join followed in a row at most.
const MOVES_MAX: usize = 4;
const EVENT_QUEUE_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Grpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
    Both,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
            Role::Both => "both",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub transport: Transport,
    pub room: String,
    pub role: Role,
    pub display_name: String,
    /// `seoul` or `busan`; empty for no preference.
    pub region: String,
    /// Upper bound on opening the channel and on each request's reply.
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    /// Report the playback position this often (subscribers); `None` never.
    pub position_interval: Option<Duration>,
    /// Reconnect and resume when the channel drops.
    pub reconnect: bool,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Stop reconnecting after this long without success.
    pub give_up_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            transport: Transport::WebSocket,
            room: String::new(),
            role: Role::Subscriber,
            display_name: String::new(),
            region: String::new(),
            request_timeout: Duration::from_secs(15),
            ping_interval: Duration::from_secs(10),
            position_interval: Some(Duration::from_secs(2)),
            reconnect: true,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// What the node told the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    TrackPublished(pb::Track),
    TrackUnpublished(String),
    TrackMuted {
        track_id: String,
        muted: bool,
    },
    /// The node asked the client to move; it is reconnecting there.
    Moved {
        url: String,
    },
    /// The channel dropped; reconnecting unless closed.
    Disconnected,
    /// Back after a drop or a move: `resumed` when the node gave the same session back.
    Reconnected {
        resumed: bool,
        session: String,
    },
    /// Reconnecting failed for [`ClientOptions::give_up_after`].
    GaveUp,
    /// An error the node sent without a request to answer.
    Error {
        code: String,
        message: String,
    },
}

/// The session state a reconnect restores.
#[derive(Debug, Default)]
struct Desired {
    selection: Option<Vec<String>>,
    layer: Option<String>,
    muted: [bool; 2],
    position_ms: u64,
}

struct Joined {
    session: String,
    resume_token: String,
    resumed: bool,
    node: String,
}

enum Command {
    Request {
        body: In,
        reply: oneshot::Sender<Result<Out, Error>>,
    },
    /// Fault injection: drop the channel and the media as a network cut would, and wait
    /// `pause` before reconnecting.
    Cut {
        pause: Duration,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

struct Inner {
    base: Mutex<Url>,
    /// Every node known (the one that answered `joined`, then its `alternates`): tried in turn
    /// when the current one cannot be reached.
    nodes: Mutex<Vec<Url>>,
    token: String,
    options: ClientOptions,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    joined: Mutex<Joined>,
    tracks: Mutex<BTreeMap<String, pb::Track>>,
    desired: Mutex<Desired>,
    reconnects: AtomicU64,
    resumes: AtomicU64,
    publishing: tokio::sync::Mutex<Option<Publishing>>,
    playing: tokio::sync::Mutex<Option<Playing>>,
    /// Set by `moved`: the media of the old node stay up until the new node's are (the old node
    /// keeps them for a grace period), so a move costs no gap.
    moving: std::sync::atomic::AtomicBool,
    held: tokio::sync::Mutex<Held>,
}

/// How a join ended: joined, or sent to another node (now the current one).
enum Opened {
    Joined(Link),
    Moved,
}

/// Media sessions of the node a client moved away from, closed once their replacements run.
#[derive(Default)]
struct Held {
    publish: Option<PublishSession>,
    play: Option<PlaySession>,
}

struct Publishing {
    options: PublishOptions,
    counters: Arc<PublishCounters>,
    session: Option<PublishSession>,
}

struct Playing {
    options: PlayOptions,
    shared: PlayShared,
    session: Option<PlaySession>,
}

/// Sends an offer for one target through the channel and returns the node's answer.
pub(crate) struct OfferSink {
    inner: Arc<Inner>,
    target: &'static str,
}

impl OfferSink {
    pub async fn exchange(&self, sdp: String) -> Result<String, Error> {
        let offer = In::Offer(pb::SessionDescription {
            target: self.target.to_string(),
            sdp,
        });
        match self.inner.request(offer).await? {
            Out::Answer(answer) => Ok(answer.sdp),
            other => Err(Error::BadAnswer(format!("expected an answer, got {other:?}"))),
        }
    }
}

/// A joined signal session.
pub struct Client {
    inner: Arc<Inner>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Opens the channel to the node at `url` (its HTTP base, e.g. `http://127.0.0.1:8080`) and
    /// joins `options.room`.
    pub async fn connect(url: &str, token: &str, options: ClientOptions) -> Result<Client, Error> {
        let base = signal::parse_url(url)?;
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (events, _) = broadcast::channel(EVENT_QUEUE_MAX);
        let inner = Arc::new(Inner {
            base: Mutex::new(base),
            nodes: Mutex::new(Vec::new()),
            token: token.to_string(),
            options,
            commands,
            events,
            joined: Mutex::new(Joined {
                session: String::new(),
                resume_token: String::new(),
                resumed: false,
                node: String::new(),
            }),
            tracks: Mutex::new(BTreeMap::new()),
            desired: Mutex::new(Desired::default()),
            reconnects: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            publishing: tokio::sync::Mutex::new(None),
            playing: tokio::sync::Mutex::new(None),
            moving: std::sync::atomic::AtomicBool::new(false),
            held: tokio::sync::Mutex::new(Held::default()),
        });
        let link = inner.open().await?;
        let driver = tokio::spawn(Arc::clone(&inner).drive(link, command_rx));
        Ok(Client { inner, driver })
    }

    /// The viewer session id; the same after a resume.
    pub fn session(&self) -> String {
        self.inner.joined.lock().session.clone()
    }

    pub fn resume_token(&self) -> String {
        self.inner.joined.lock().resume_token.clone()
    }

    /// Whether the last join gave an earlier session back.
    pub fn resumed(&self) -> bool {
        self.inner.joined.lock().resumed
    }

    /// The node serving the session.
    pub fn node(&self) -> String {
        self.inner.joined.lock().node.clone()
    }

    /// The room's tracks as last told.
    pub fn tracks(&self) -> Vec<pb::Track> {
        self.inner.tracks.lock().values().cloned().collect()
    }

    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Reconnects after a drop, and of those, the ones that got the same session back.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    pub fn resumes(&self) -> u64 {
        self.inner.resumes.load(Ordering::Relaxed)
    }

    /// Publishes synthetic media over the channel (again after every reconnect).
    pub async fn publish(&self, options: PublishOptions) -> Result<(), Error> {
        let counters = Arc::new(PublishCounters::default());
        let session = self
            .inner
            .start_publishing(options.clone(), Arc::clone(&counters))
            .await?;
        *self.inner.publishing.lock().await = Some(Publishing {
            options,
            counters,
            session: Some(session),
        });
        Ok(())
    }

    /// Receives the room's media over the channel (again after every reconnect).
    pub async fn play(&self, options: PlayOptions) -> Result<(), Error> {
        let shared = PlayShared::new();
        let session = self.inner.start_playing(options.clone(), shared.clone()).await?;
        *self.inner.playing.lock().await = Some(Playing {
            options,
            shared,
            session: Some(session),
        });
        Ok(())
    }

    pub async fn publish_stats(&self) -> PublishStats {
        match self.inner.publishing.lock().await.as_ref() {
            Some(p) => whip::snapshot(&p.counters),
            None => PublishStats::default(),
        }
    }

    pub async fn play_stats(&self) -> PlayStats {
        match self.inner.playing.lock().await.as_ref() {
            Some(p) => p.shared.stats(),
            None => PlayStats::default(),
        }
    }

    /// Waits until the playback has a whole keyframe (see [`PlaySession::wait_first_frame`]).
    pub async fn wait_first_frame(&self, timeout: Duration) -> Result<Duration, Error> {
        // The statistics outlive reconnects: wait on them, not on one connection.
        let shared = match self.inner.playing.lock().await.as_ref() {
            Some(playing) => playing.shared.clone(),
            None => PlayShared::new(),
        };
        shared.wait_first_frame(timeout, || false).await
    }

    /// Forwards only these tracks (ids from [`Client::tracks`]), in addition to earlier ones.
    pub async fn subscribe(&self, track_ids: Vec<String>) -> Result<(), Error> {
        self.inner
            .request(In::Subscribe(pb::Subscribe {
                track_ids: track_ids.clone(),
            }))
            .await?;
        let mut desired = self.inner.desired.lock();
        let selection = desired.selection.get_or_insert_with(Vec::new);
        for id in track_ids {
            if !selection.contains(&id) {
                selection.push(id);
            }
        }
        Ok(())
    }

    pub async fn unsubscribe(&self, track_ids: Vec<String>) -> Result<(), Error> {
        self.inner
            .request(In::Unsubscribe(pb::Unsubscribe {
                track_ids: track_ids.clone(),
            }))
            .await?;
        let tracks: Vec<String> = self.inner.tracks.lock().keys().cloned().collect();
        let mut desired = self.inner.desired.lock();
        let selection = desired.selection.get_or_insert(tracks);
        selection.retain(|id| !track_ids.contains(id));
        Ok(())
    }

    /// `low`, `mid`, `high` or `auto`.
    pub async fn set_layer(&self, layer: &str) -> Result<(), Error> {
        self.inner
            .request(In::SetLayer(pb::SetLayer {
                layer: layer.to_string(),
            }))
            .await?;
        self.inner.desired.lock().layer = Some(layer.to_string());
        Ok(())
    }

    /// Mutes or unmutes this client's published `kind` (`audio` or `video`).
    pub async fn mute(&self, kind: &str, muted: bool) -> Result<(), Error> {
        self.inner
            .request(In::Mute(pb::Mute {
                kind: kind.to_string(),
                muted,
            }))
            .await?;
        self.inner.desired.lock().muted[usize::from(kind == "video")] = muted;
        Ok(())
    }

    /// Reports the playback position now (it is also reported every `position_interval`).
    pub async fn report_position(&self, position_ms: u64) -> Result<(), Error> {
        self.inner.desired.lock().position_ms = position_ms;
        self.inner
            .request(In::Position(pb::PositionReport { position_ms }))
            .await
            .map(drop)
    }

    /// Sends any message and returns the node's reply (for tools and tests of the protocol).
    pub async fn request(&self, body: In) -> Result<Out, Error> {
        self.inner.request(body).await
    }

    /// Cuts the channel and the media as a network failure would, and reconnects after
    /// `pause` (fault injection for tests and demos).
    pub async fn cut(&self, pause: Duration) -> Result<(), Error> {
        self.inner
            .commands
            .send(Command::Cut { pause })
            .await
            .map_err(|_| Error::Channel("the client has stopped".into()))
    }

    /// Leaves the room: the node ends the session and forgets the viewer state.
    pub async fn close(self) {
        let (done, done_rx) = oneshot::channel();
        if self.inner.commands.send(Command::Close { done }).await.is_ok() {
            let _ = tokio::time::timeout(self.inner.options.request_timeout, done_rx).await;
        }
        self.inner.stop_media().await;
        self.driver.abort();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One open transport.
enum Link {
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>),
    Grpc {
        outgoing: mpsc::Sender<pb::ClientMessage>,
        incoming: Box<tonic::Streaming<pb::ServerMessage>>,
    },
}

impl Link {
    async fn send(&mut self, message: pb::ClientMessage) -> Result<(), Error> {
        match self {
            Link::Ws(ws) => ws
                .send(tungstenite::Message::text(json::encode_client(&message)))
                .await
                .map_err(|e| Error::Channel(e.to_string())),
            Link::Grpc { outgoing, .. } => outgoing
                .send(message)
                .await
                .map_err(|_| Error::Channel("gRPC stream closed".into())),
        }
    }

    /// The next message; `None` when the transport has ended.
    async fn recv(&mut self) -> Option<pb::ServerMessage> {
        loop {
            match self {
                Link::Ws(ws) => match ws.next().await? {
                    Ok(tungstenite::Message::Text(text)) => match json::decode_server(&text) {
                        Ok(message) => return Some(message),
                        Err(error) => tracing::warn!(%error, "undecodable message from the node"),
                    },
                    Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {} // pings are answered by the library
                },
                Link::Grpc { incoming, .. } => return incoming.message().await.ok().flatten(),
            }
        }
    }
}

impl Inner {
    async fn request(&self, body: In) -> Result<Out, Error> {
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Request { body, reply })
            .await
            .map_err(|_| Error::Channel("the client has stopped".into()))?;
        let timeout = self.options.request_timeout;
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Channel("the channel dropped before the reply".into())),
            Err(_) => Err(Error::Timeout {
                what: "the signal reply",
                after: timeout,
            }),
        }
    }

    /// Opens a transport to the current node and joins (with the resume token, if any),
    /// following `moved` replies to the node that hosts the room.
    async fn open(&self) -> Result<Link, Error> {
        for _ in 0..MOVES_MAX {
            match self.open_once().await? {
                Opened::Joined(link) => return Ok(link),
                Opened::Moved => tracing::debug!(url = %self.base.lock(), "joined elsewhere: moved"),
            }
        }
        Err(Error::Channel(format!("moved more than {MOVES_MAX} times in a row")))
    }

    /// Takes a `moved`: the node it names becomes the current one, with the resume token.
    fn follow_moved(&self, moved: pb::Moved) -> Result<(), String> {
        *self.base.lock() = Url::parse(&moved.url).map_err(|e| e.to_string())?;
        self.joined.lock().resume_token = moved.resume_token;
        Ok(())
    }

    async fn open_once(&self) -> Result<Opened, Error> {
        let timeout = self.options.request_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut link = self.open_transport().await?;
            let resume_token = self.joined.lock().resume_token.clone();
            let join = pb::ClientMessage {
                id: 1,
                body: Some(In::Join(pb::Join {
                    room: self.options.room.clone(),
                    role: self.options.role.as_str().to_string(),
                    region: self.options.region.clone(),
                    display_name: self.options.display_name.clone(),
                    resume_token,
                    token: String::new(),
                })),
            };
            link.send(join).await?;
            loop {
                let Some(message) = link.recv().await else {
                    return Err(Error::Channel("the node closed the channel before joined".into()));
                };
                match message.body {
                    Some(Out::Moved(moved)) => {
                        let url = moved.url.clone();
                        self.follow_moved(moved)
                            .map_err(|e| Error::BadAnswer(format!("moved to {url:?}: {e}")))?;
                        return Ok(Opened::Moved);
                    }
                    Some(Out::Joined(joined)) => {
                        let here = self.base.lock().clone();
                        let others = joined.alternates.iter().filter_map(|u| Url::parse(u).ok());
                        *self.nodes.lock() = std::iter::once(here).chain(others).collect();
                        *self.tracks.lock() = joined.tracks.iter().map(|t| (t.id.clone(), t.clone())).collect();
                        *self.joined.lock() = Joined {
                            session: joined.session,
                            resume_token: joined.resume_token,
                            resumed: joined.resumed,
                            node: joined.node,
                        };
                        return Ok(Opened::Joined(link));
                    }
                    Some(Out::Error(error)) if message.id == 1 || error.fatal => {
                        return Err(Error::Signal {
                            code: error.code,
                            message: error.message,
                            fatal: error.fatal,
                        });
                    }
                    _ => {}
                }
            }
        })
        .await;
        opened.unwrap_or(Err(Error::Timeout {
            what: "joining over the signal channel",
            after: timeout,
        }))
    }

    async fn open_transport(&self) -> Result<Link, Error> {
        let base = self.base.lock().clone();
        match self.options.transport {
            Transport::WebSocket => {
                let mut url = base
                    .join("/signal")
                    .map_err(|e| Error::Channel(format!("no signal URL from {base}: {e}")))?;
                let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
                url.set_scheme(scheme)
                    .map_err(|_| Error::Channel("cannot make a WebSocket URL".into()))?;
                let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
                    .map_err(|e| Error::Channel(e.to_string()))?;
                let bearer = format!("Bearer {}", self.token)
                    .parse()
                    .map_err(|_| Error::Channel("the token is not a valid header value".into()))?;
                request.headers_mut().insert("authorization", bearer);
                let (ws, _) = tokio_tungstenite::connect_async(request)
                    .await
                    .map_err(|e| Error::Channel(format!("WebSocket to {url}: {e}")))?;
                Ok(Link::Ws(Box::new(ws)))
            }
            Transport::Grpc => {
                let grpc = grpc_address(&base).await?;
                let channel = tonic::transport::Endpoint::from_shared(grpc.clone())
                    .map_err(|e| Error::Channel(format!("gRPC address {grpc:?}: {e}")))?
                    .connect_timeout(self.options.request_timeout)
                    .connect()
                    .await
                    .map_err(|e| Error::Channel(format!("gRPC to {grpc}: {e}")))?;
                let (outgoing, outgoing_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
                let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing_rx));
                let bearer = format!("Bearer {}", self.token)
                    .parse()
                    .map_err(|_| Error::Channel("the token is not valid metadata".into()))?;
                request.metadata_mut().insert("authorization", bearer);
                let incoming = pb::signal_client::SignalClient::new(channel)
                    .connect(request)
                    .await
                    .map_err(|status| Error::Signal {
                        code: format!("{:?}", status.code()).to_lowercase(),
                        message: status.message().to_string(),
                        fatal: true,
                    })?
                    .into_inner();
                Ok(Link::Grpc {
                    outgoing,
                    incoming: Box::new(incoming),
                })
            }
        }
    }

    /// Runs the channel: requests out, replies and events in, pings, positions, reconnects.
    async fn drive(self: Arc<Self>, mut link: Link, mut commands: mpsc::Receiver<Command>) {
        let mut pending: HashMap<u64, oneshot::Sender<Result<Out, Error>>> = HashMap::new();
        let mut next_id = 2u64;
        let mut ping = tokio::time::interval(self.options.ping_interval);
        ping.tick().await;
        let subscribing = matches!(self.options.role, Role::Subscriber | Role::Both);
        let position_every = self.options.position_interval.filter(|_| subscribing);
        let mut position = tokio::time::interval(position_every.unwrap_or(Duration::from_secs(3600)));
        position.tick().await;
        loop {
            let lost_pause = loop {
                tokio::select! {
                    command = commands.recv() => match command {
                        Some(Command::Request { body, reply }) => {
                            let id = next_id;
                            next_id += 1;
                            if let Err(error) = link.send(pb::ClientMessage { id, body: Some(body) }).await {
                                let _ = reply.send(Err(error));
                                break Duration::ZERO;
                            }
                            pending.insert(id, reply);
                        }
                        Some(Command::Cut { pause }) => break pause,
                        Some(Command::Close { done }) => {
                            let leave = pb::ClientMessage { id: 0, body: Some(In::Leave(pb::Leave {})) };
                            let _ = link.send(leave).await;
                            // Wait for the node to close, so the leave is processed.
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while link.recv().await.is_some() {}
                            })
                            .await;
                            let _ = done.send(());
                            return;
                        }
                        None => return,
                    },
                    message = link.recv() => match message {
                        Some(message) => self.on_message(message, &mut pending),
                        None => break Duration::ZERO,
                    },
                    _ = ping.tick() => {
                        let message = pb::ClientMessage { id: 0, body: Some(In::Ping(pb::Ping { timestamp_ms: 0 })) };
                        if link.send(message).await.is_err() {
                            break Duration::ZERO;
                        }
                    }
                    _ = position.tick(), if position_every.is_some() => {
                        let position_ms = self.desired.lock().position_ms;
                        let message = pb::ClientMessage {
                            id: 0,
                            body: Some(In::Position(pb::PositionReport { position_ms })),
                        };
                        if link.send(message).await.is_err() {
                            break Duration::ZERO;
                        }
                    }
                }
            };
            // The channel is gone: so are the node's media sessions for it.
            for (_, reply) in pending.drain() {
                let _ = reply.send(Err(Error::Channel("the channel dropped".into())));
            }
            drop(link);
            if self.moving.swap(false, Ordering::AcqRel) {
                self.hold_media().await;
            } else {
                self.stop_media().await;
            }
            let _ = self.events.send(Event::Disconnected);
            if !self.options.reconnect {
                return;
            }
            tokio::time::sleep(lost_pause).await;
            match self.reconnect().await {
                Some(reopened) => link = reopened,
                None => {
                    let _ = self.events.send(Event::GaveUp);
                    return;
                }
            }
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            let (resumed, session) = {
                let joined = self.joined.lock();
                (joined.resumed, joined.session.clone())
            };
            if resumed {
                self.resumes.fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.events.send(Event::Reconnected { resumed, session });
            // Media is set up again by requests through this driver: another task.
            tokio::spawn(Arc::clone(&self).restore());
        }
    }

    async fn reconnect(&self) -> Option<Link> {
        let started = tokio::time::Instant::now();
        let mut backoff = self.options.backoff_initial;
        loop {
            match self.open().await {
                Ok(link) => return Some(link),
                Err(error) => {
                    tracing::debug!(%error, "reconnect failed");
                    // The node may be gone: the next attempt goes to another one (the resume
                    // token works on every node).
                    if matches!(error, Error::Channel(_) | Error::Http { .. } | Error::Timeout { .. }) {
                        self.next_node();
                    }
                }
            }
            if started.elapsed() >= self.options.give_up_after {
                return None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.backoff_max);
        }
    }

    /// Points the client at the next known node after the current one (round robin; a `moved`
    /// target not in the list is followed by the first node).
    fn next_node(&self) {
        let nodes = self.nodes.lock();
        if nodes.is_empty() {
            return;
        }
        let mut base = self.base.lock();
        let next = match nodes.iter().position(|n| n.origin() == base.origin()) {
            Some(i) => (i + 1) % nodes.len(),
            None => 0,
        };
        *base = nodes[next].clone();
    }

    fn on_message(&self, message: pb::ServerMessage, pending: &mut HashMap<u64, oneshot::Sender<Result<Out, Error>>>) {
        let Some(body) = message.body else { return };
        if message.id != 0
            && let Some(reply) = pending.remove(&message.id)
        {
            let result = match body {
                Out::Error(error) => Err(Error::Signal {
                    code: error.code,
                    message: error.message,
                    fatal: error.fatal,
                }),
                other => Ok(other),
            };
            let _ = reply.send(result);
            return;
        }
        let event = match body {
            Out::TrackPublished(published) => {
                let Some(track) = published.track else { return };
                self.tracks.lock().insert(track.id.clone(), track.clone());
                Event::TrackPublished(track)
            }
            Out::TrackUnpublished(gone) => {
                self.tracks.lock().remove(&gone.track_id);
                Event::TrackUnpublished(gone.track_id)
            }
            Out::TrackMuted(muted) => {
                if let Some(track) = self.tracks.lock().get_mut(&muted.track_id) {
                    track.muted = muted.muted;
                }
                Event::TrackMuted {
                    track_id: muted.track_id,
                    muted: muted.muted,
                }
            }
            Out::Moved(moved) => {
                let url = moved.url.clone();
                if let Err(error) = self.follow_moved(moved) {
                    tracing::warn!(%error, %url, "moved to an unusable URL");
                }
                self.moving.store(true, Ordering::Release);
                let _ = self.commands.try_send(Command::Cut { pause: Duration::ZERO });
                Event::Moved { url }
            }
            Out::Error(error) => Event::Error {
                code: error.code,
                message: error.message,
            },
            _ => return, // pongs, acks of fire-and-forget messages
        };
        let _ = self.events.send(event);
    }

    async fn start_publishing(
        self: &Arc<Self>,
        options: PublishOptions,
        counters: Arc<PublishCounters>,
    ) -> Result<PublishSession, Error> {
        let sink = OfferSink {
            inner: Arc::clone(self),
            target: "publisher",
        };
        whip::publish_over(Signaling::Channel(sink), options, counters).await
    }

    async fn start_playing(self: &Arc<Self>, options: PlayOptions, shared: PlayShared) -> Result<PlaySession, Error> {
        let sink = OfferSink {
            inner: Arc::clone(self),
            target: "subscriber",
        };
        whep::play_over(Signaling::Channel(sink), options, shared).await
    }

    async fn stop_media(&self) {
        if let Some(publishing) = self.publishing.lock().await.as_mut()
            && let Some(session) = publishing.session.take()
        {
            let _ = session.close().await;
        }
        if let Some(playing) = self.playing.lock().await.as_mut()
            && let Some(session) = playing.session.take()
        {
            let _ = session.close().await;
        }
    }

    /// After `moved`: keeps the media sessions running while the client joins the new node.
    async fn hold_media(&self) {
        let mut held = self.held.lock().await;
        if let Some(publishing) = self.publishing.lock().await.as_mut() {
            held.publish = publishing.session.take();
        }
        if let Some(playing) = self.playing.lock().await.as_mut() {
            held.play = playing.session.take();
        }
    }

    /// After a reconnect: the choices a fresh session lacks, then the media again.
    async fn restore(self: Arc<Self>) {
        let resumed = self.joined.lock().resumed;
        let (selection, layer, muted) = {
            let desired = self.desired.lock();
            (desired.selection.clone(), desired.layer.clone(), desired.muted)
        };
        if !resumed {
            if let Some(track_ids) = selection.filter(|s| !s.is_empty()) {
                let _ = self.request(In::Subscribe(pb::Subscribe { track_ids })).await;
            }
            if let Some(layer) = layer {
                let _ = self.request(In::SetLayer(pb::SetLayer { layer })).await;
            }
        }
        for (index, kind) in ["audio", "video"].into_iter().enumerate() {
            if muted[index] {
                let mute = In::Mute(pb::Mute {
                    kind: kind.to_string(),
                    muted: true,
                });
                let _ = self.request(mute).await;
            }
        }
        let mut publishing = self.publishing.lock().await;
        if let Some(p) = publishing.as_mut() {
            match self.start_publishing(p.options.clone(), Arc::clone(&p.counters)).await {
                Ok(session) => p.session = Some(session),
                Err(error) => tracing::warn!(%error, "publishing again after a reconnect failed"),
            }
        }
        drop(publishing);
        // The new node has the media now (or never will): the old node's copy goes.
        if let Some(old) = self.held.lock().await.publish.take() {
            let _ = old.close().await;
        }
        let mut playing = self.playing.lock().await;
        if let Some(p) = playing.as_mut() {
            match self.start_playing(p.options.clone(), p.shared.clone()).await {
                Ok(session) => p.session = Some(session),
                Err(error) => tracing::warn!(%error, "playing again after a reconnect failed"),
            }
        }
        let shared = playing.as_ref().map(|p| p.shared.clone());
        drop(playing);
        if let Some(old) = self.held.lock().await.play.take() {
            if let Some(shared) = shared {
                shared.wait_newest_counting(MOVE_OVERLAP_MAX).await;
            }
            let _ = old.close().await;
        }
    }
}

/// Asks the node where its gRPC transport listens (`GET /signal` with `x-signal-mode: grpc`).
async fn grpc_address(base: &Url) -> Result<String, Error> {
    let url = base
        .join("/signal")
        .map_err(|e| Error::Channel(format!("no signal URL from {base}: {e}")))?;
    let response = signal::default_http_client()
        .get(url.clone())
        .header("x-signal-mode", "grpc")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|source| Error::Http {
            url: url.to_string(),
            source,
        })?;
    let body: serde_json::Value = response.json().await.map_err(|source| Error::Http {
        url: url.to_string(),
        source,
    })?;
    body.get("grpc")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| Error::Channel(format!("{url} did not name a gRPC address")))
}
