//! One signal session: the ordering rules, the room requests behind each message, the viewer
//! state kept in the store for resume, and the idle timeout. Transport-agnostic: it reads
//! [`Inbound`] items and writes [`ServerMessage`]s, and ends by returning (the transport then
//! closes its connection).

use super::resume::ResumeClaims;
use super::{ErrorCode as Code, Inbound, QUEUE_MAX, SignalContext};
use crate::auth::{AuthError, Claims, Grant};
use mediamesh_actors::media::layer::{LAYER_NAMES, layer_named};
use mediamesh_actors::media::track::MediaKind;
use mediamesh_actors::pii::Pii;
use mediamesh_actors::ports::Host;
use mediamesh_actors::room::{RoomReply, RoomRequest, Traced};
use mediamesh_actors::{Access, Identity, RoomError, RoomId, RoomNotice, SessionId, SessionKind, TrackInfo};
use mediamesh_cluster::ViewerState;
use mediamesh_proto::signal::v1 as pb;
use pb::client_message::Body as In;
use pb::server_message::Body as Out;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Track ids one subscribe or unsubscribe may name, and a viewer may hold.
const TRACK_IDS_MAX: usize = 64;
/// A track id longer than this is refused.
const TRACK_ID_BYTES_MAX: usize = 200;
/// Display names are cut to this many characters.
const DISPLAY_NAME_CHARS_MAX: usize = 64;
/// The final viewer-state write of an ending session waits at most this long.
const FINAL_PERSIST_TIMEOUT: Duration = Duration::from_secs(2);

/// An error reply: a stable code, a message, and whether the session ends after it.
#[derive(Debug)]
struct Refusal {
    code: Code,
    message: String,
    fatal: bool,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fatal: false,
        }
    }

    fn fatal(mut self) -> Self {
        self.fatal = true;
        self
    }
}

impl From<RoomError> for Refusal {
    fn from(error: RoomError) -> Self {
        let code = match &error {
            RoomError::NodeFull(..) => Code::NodeFull,
            RoomError::RoomFull(..) => Code::RoomFull,
            RoomError::BadOffer(_) | RoomError::BadFragment(_) => Code::BadRequest,
            RoomError::UnknownSession => Code::NotFound,
            RoomError::PreconditionFailed => Code::OutOfOrder,
            RoomError::Closing | RoomError::Directory(_) | RoomError::Media(_) | RoomError::Elsewhere(_) => {
                Code::Internal
            }
        };
        Refusal::new(code, error.to_string())
    }
}

impl From<AuthError> for Refusal {
    fn from(error: AuthError) -> Self {
        let code = if error.is_forbidden() {
            Code::Forbidden
        } else {
            Code::Unauthorized
        };
        Refusal::new(code, error.to_string()).fatal()
    }
}

#[derive(Debug, Clone, Copy)]
struct Role {
    publish: bool,
    subscribe: bool,
}

impl Role {
    fn parse(text: &str) -> Result<Role, Refusal> {
        match text {
            "publisher" => Ok(Role {
                publish: true,
                subscribe: false,
            }),
            "subscriber" => Ok(Role {
                publish: false,
                subscribe: true,
            }),
            "both" => Ok(Role {
                publish: true,
                subscribe: true,
            }),
            other => Err(Refusal::new(
                Code::BadRequest,
                format!("role must be publisher, subscriber or both, not {other:.20?}"),
            )),
        }
    }
}

fn parse_target(target: &str) -> Result<SessionKind, Refusal> {
    match target {
        "publisher" => Ok(SessionKind::Publisher),
        "subscriber" => Ok(SessionKind::Subscriber),
        other => Err(Refusal::new(
            Code::BadRequest,
            format!("target must be publisher or subscriber, not {other:.20?}"),
        )),
    }
}

fn target_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Publisher => "publisher",
        SessionKind::Subscriber => "subscriber",
    }
}

fn parse_layer(text: &str) -> Result<Option<u8>, Refusal> {
    if text.is_empty() || text == "auto" {
        return Ok(None);
    }
    layer_named(text).map(Some).ok_or_else(|| {
        Refusal::new(
            Code::BadRequest,
            format!("layer must be low, mid, high or auto, not {text:.20?}"),
        )
    })
}

fn parse_kind(text: &str) -> Result<MediaKind, Refusal> {
    match text {
        "audio" => Ok(MediaKind::Audio),
        "video" => Ok(MediaKind::Video),
        other => Err(Refusal::new(
            Code::BadRequest,
            format!("kind must be audio or video, not {other:.20?}"),
        )),
    }
}

fn check_track_ids(ids: &[String]) -> Result<(), Refusal> {
    if ids.is_empty() || ids.len() > TRACK_IDS_MAX {
        return Err(Refusal::new(
            Code::BadRequest,
            format!("name 1 to {TRACK_IDS_MAX} track ids"),
        ));
    }
    if let Some(id) = ids.iter().find(|id| id.is_empty() || id.len() > TRACK_ID_BYTES_MAX) {
        return Err(Refusal::new(
            Code::BadRequest,
            format!("track id {id:.40?} is empty or longer than {TRACK_ID_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub fn track_message(track: &TrackInfo) -> pb::Track {
    pb::Track {
        id: track.id.clone(),
        kind: track.kind.to_string(),
        codec: track.codec.to_string(),
        layers: track.layers.clone(),
        muted: track.muted,
        publisher: track.publisher.clone(),
    }
}

/// The state of a joined session.
struct Joined {
    room: RoomId,
    identity: Identity,
    /// The viewer session id: survives resumes.
    viewer: String,
    role: Role,
    publisher: Option<SessionId>,
    subscriber: Option<SessionId>,
    /// Chosen track ids; `None` for the room's defaults.
    selection: Option<Vec<String>>,
    layer: Option<u8>,
    /// Muted kinds, indexed by `MediaKind::index`.
    muted: [bool; 2],
    position_ms: u64,
    /// Track notices of the room; `None` after the room closed (re-watched on the next request).
    notices: Option<mpsc::Receiver<RoomNotice>>,
    /// The viewer state the persister writes (subscribers only).
    persist: Option<watch::Sender<Option<ViewerState>>>,
    persister: Option<tokio::task::JoinHandle<()>>,
    registration: super::Registration,
    /// The session's resume token (given again in `moved`).
    resume_token: String,
    /// The client's region preference (`join.region`), for placing the room.
    region: Option<String>,
    /// The display name as the store keeps it (masked when it has Hangul, see `--mask-names`).
    display_name: String,
    /// This signal session's own id in the viewer state (`ViewerState::session`): the store
    /// takes writes of one generation from one session only.
    session: String,
    /// The state's generation: one more than the state a resume took over, so the store ignores
    /// late writes of the session the viewer left.
    generation: u64,
}

impl Joined {
    fn viewer_state(&self, node: &str) -> ViewerState {
        let mut layers = BTreeMap::new();
        if let Some(layer) = self.layer {
            layers.insert("video".to_string(), LAYER_NAMES[usize::from(layer)].to_string());
        }
        ViewerState {
            viewer: mediamesh_cluster::ViewerId::new(self.viewer.clone()),
            room: mediamesh_cluster::RoomId::new(self.room.to_string()),
            node: mediamesh_cluster::NodeId::new(node),
            session: self.session.clone(),
            display_name: self.display_name.clone(),
            position_ms: self.position_ms,
            subscriptions: self.selection.clone().unwrap_or_default(),
            layers,
            updated_at_ms: 0,
            expires_at_ms: 0,
            revision: 0,
            generation: self.generation,
        }
    }
}

/// Whether the session goes on after a message.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// `leave`: end, and forget the viewer state.
    Leave,
    /// A fatal error was sent: end, keeping the viewer state for a resume.
    Stop,
    /// A resume took the viewer over: end without writing its state, the new session owns it.
    Replaced,
    /// `moved` was sent: end, keeping the viewer state for the resume on the other node and the
    /// media sessions for [`MOVE_GRACE`], so the client's media run until the new node's do.
    Moved,
}

/// How long the media sessions of a client told `moved` outlive its signal session (unless the
/// client closes them first).
const MOVE_GRACE: Duration = Duration::from_secs(3);

struct Session {
    ctx: Arc<SignalContext>,
    out: mpsc::Sender<pb::ServerMessage>,
    /// Verified at connect time (signature and expiry; room and grants at join).
    claims: Option<Claims>,
    /// The region preference the transport carried (`x-region-preference`, `x-korean-region`).
    region: Option<String>,
    joined: Option<Joined>,
}

/// Runs one session until the client leaves, the transport closes, the idle timeout passes, or a
/// resume elsewhere takes it over. `claims` come from a token the transport already verified.
pub async fn run(
    ctx: Arc<SignalContext>,
    _admission: super::Admission,
    transport: super::Transport,
    claims: Option<Claims>,
    region: Option<String>,
    mut inbound: mpsc::Receiver<Inbound>,
    out: mpsc::Sender<pb::ServerMessage>,
) {
    let sessions = ctx.stats.sessions(transport);
    sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut session = Session {
        ctx: Arc::clone(&ctx),
        out,
        claims,
        region,
        joined: None,
    };
    let mut last_heard = Instant::now();
    let mut idle_check = tokio::time::interval(Duration::from_millis(250).min(ctx.idle_timeout / 4));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let flow = loop {
        let cancelled = session
            .joined
            .as_ref()
            .map(|j| j.registration.cancelled.clone())
            .unwrap_or_default();
        tokio::select! {
            item = inbound.recv() => {
                let Some(item) = item else { break Flow::Continue };
                last_heard = Instant::now();
                let flow = session.on_inbound(item).await;
                if flow != Flow::Continue {
                    break flow;
                }
            }
            notice = next_notice(&mut session.joined) => {
                let flow = session.on_notice(notice).await;
                if flow != Flow::Continue {
                    break flow;
                }
            }
            _ = idle_check.tick() => {
                if last_heard.elapsed() >= ctx.idle_timeout {
                    let message = format!("nothing received for {} ms", ctx.idle_timeout.as_millis());
                    session.send_error(0, Refusal::new(Code::IdleTimeout, message).fatal()).await;
                    break Flow::Stop;
                }
            }
            _ = cancelled.cancelled() => {
                let refusal = Refusal::new(Code::Replaced, "this session was resumed on another connection").fatal();
                session.send_error(0, refusal).await;
                break Flow::Replaced;
            }
        }
    };
    session.end(flow).await;
    sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

async fn next_notice(joined: &mut Option<Joined>) -> Option<RoomNotice> {
    match joined.as_mut().and_then(|j| j.notices.as_mut()) {
        Some(notices) => notices.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn send(&self, id: u64, body: Out) {
        // A closed transport just means the session is ending.
        let _ = self.out.send(pb::ServerMessage { id, body: Some(body) }).await;
    }

    async fn send_error(&self, id: u64, refusal: Refusal) {
        tracing::debug!(code = refusal.code.as_str(), message = %refusal.message, "signal error reply");
        self.ctx.stats.error(refusal.code);
        let error = pb::Error {
            code: refusal.code.as_str().to_string(),
            message: refusal.message,
            fatal: refusal.fatal,
        };
        self.send(id, Out::Error(error)).await;
    }

    async fn on_inbound(&mut self, item: Inbound) -> Flow {
        let (id, result) = match item {
            Inbound::Heartbeat => return Flow::Continue,
            Inbound::Malformed { id, reason } => (id, Err(Refusal::new(Code::BadRequest, reason))),
            Inbound::Unknown { id, kind } => (
                id,
                Err(Refusal::new(
                    Code::UnknownMessage,
                    if kind.is_empty() {
                        "no message type this node knows".to_string()
                    } else {
                        format!("unknown message type {kind:.40?}")
                    },
                )),
            ),
            Inbound::TooLarge => (
                0,
                Err(Refusal::new(
                    Code::TooLarge,
                    format!("a frame is at most {} bytes", super::FRAME_BYTES_MAX),
                )
                .fatal()),
            ),
            Inbound::Message(message) => {
                let id = message.id;
                match message.body {
                    None => (
                        id,
                        Err(Refusal::new(Code::UnknownMessage, "no message type this node knows")),
                    ),
                    Some(In::Leave(_)) => return Flow::Leave,
                    Some(body) => {
                        let span = tracing::info_span!("signal", otel.name = message_name(&body));
                        (id, self.on_message(body).instrument(span).await)
                    }
                }
            }
        };
        match result {
            Ok(Some(reply @ Out::Moved(_))) => {
                // Joined on a node that does not host the room for a publisher: go there.
                self.send(id, reply).await;
                Flow::Moved
            }
            Ok(Some(reply)) => {
                self.send(id, reply).await;
                Flow::Continue
            }
            Ok(None) => Flow::Continue,
            Err(refusal) => {
                let fatal = refusal.fatal;
                self.send_error(id, refusal).await;
                if fatal { Flow::Stop } else { Flow::Continue }
            }
        }
    }

    fn joined(&mut self) -> Result<&mut Joined, Refusal> {
        self.joined
            .as_mut()
            .ok_or_else(|| Refusal::new(Code::NotJoined, "send join first"))
    }

    async fn on_message(&mut self, body: In) -> Result<Option<Out>, Refusal> {
        match body {
            In::Ping(ping) => Ok(Some(Out::Pong(pb::Pong {
                timestamp_ms: ping.timestamp_ms,
            }))),
            In::Join(join) => self.join(join).await.map(Some),
            In::Offer(offer) => self.offer(offer).await.map(Some),
            In::Answer(answer) => {
                self.joined()?;
                Err(Refusal::new(
                    Code::OutOfOrder,
                    format!("answer for {:.20?} without an offer from the node", answer.target),
                ))
            }
            In::Trickle(trickle) => self.trickle(trickle).await,
            In::Subscribe(subscribe) => {
                check_track_ids(&subscribe.track_ids)?;
                let joined = self.joined()?;
                require(joined.role.subscribe, "subscribe")?;
                let mut selection = joined.selection.clone().unwrap_or_default();
                for id in subscribe.track_ids {
                    if !selection.contains(&id) {
                        selection.push(id);
                    }
                }
                if selection.len() > TRACK_IDS_MAX {
                    return Err(Refusal::new(
                        Code::BadRequest,
                        format!("a viewer holds at most {TRACK_IDS_MAX} subscriptions"),
                    ));
                }
                self.select(Some(selection)).await
            }
            In::Unsubscribe(unsubscribe) => {
                check_track_ids(&unsubscribe.track_ids)?;
                let joined = self.joined()?;
                require(joined.role.subscribe, "unsubscribe")?;
                let current = match joined.selection.clone() {
                    Some(selection) => selection,
                    // From the defaults: everything in the room now but what is named.
                    None => self.room_tracks().await?.into_iter().map(|t| t.id).collect(),
                };
                let selection = current
                    .into_iter()
                    .filter(|id| !unsubscribe.track_ids.contains(id))
                    .collect();
                self.select(Some(selection)).await
            }
            In::SetLayer(set) => {
                let layer = parse_layer(&set.layer)?;
                let joined = self.joined()?;
                require(joined.role.subscribe, "set_layer")?;
                joined.layer = layer;
                let subscriber = joined.subscriber.clone();
                self.persist();
                if let Some(session) = subscriber {
                    self.room_request(RoomRequest::SetLayer { session, layer }).await?;
                }
                Ok(Some(Out::Ack(pb::Ack {})))
            }
            In::Mute(mute) => {
                let kind = parse_kind(&mute.kind)?;
                let joined = self.joined()?;
                require(joined.role.publish, "mute")?;
                joined.muted[kind.index()] = mute.muted;
                if let Some(session) = joined.publisher.clone() {
                    self.room_request(RoomRequest::Mute {
                        session,
                        kind,
                        muted: mute.muted,
                    })
                    .await?;
                }
                Ok(Some(Out::Ack(pb::Ack {})))
            }
            In::Position(position) => {
                let joined = self.joined()?;
                require(joined.role.subscribe, "position")?;
                joined.position_ms = position.position_ms;
                self.persist();
                Ok(Some(Out::Ack(pb::Ack {})))
            }
            In::Leave(_) => Ok(None), // handled by the caller
        }
    }

    async fn join(&mut self, join: pb::Join) -> Result<Out, Refusal> {
        if self.joined.is_some() {
            return Err(Refusal::new(Code::AlreadyJoined, "this session already joined a room"));
        }
        let room = RoomId::parse(&join.room).ok_or_else(|| {
            Refusal::new(
                Code::BadRequest,
                format!(
                    "invalid room name: 1 to {} characters of A-Z a-z 0-9 _ . -",
                    mediamesh_actors::ids::ROOM_NAME_BYTES_MAX
                ),
            )
        })?;
        let role = Role::parse(&join.role)?;
        if !matches!(join.region.as_str(), "" | "seoul" | "busan") {
            return Err(Refusal::new(
                Code::BadRequest,
                format!("region must be seoul or busan, not {:.20?}", join.region),
            ));
        }
        let claims = match (&self.claims, join.token.as_str()) {
            (Some(claims), _) => claims.clone(),
            (None, "") => return Err(AuthError::Missing.into()),
            (None, token) => self.ctx.keys.verify(token)?,
        };
        for (wanted, grant) in [(role.publish, Grant::Publish), (role.subscribe, Grant::Subscribe)] {
            if wanted {
                self.ctx.keys.check(&claims, grant, Some(room.as_str()))?;
            }
        }
        let identity = Identity(claims.sub.clone());
        let ice_servers: Vec<pb::IceServer> = self
            .ctx
            .turn
            .as_ref()
            .map(|turn| turn.ice_servers(&claims.sub, (!join.region.is_empty()).then_some(join.region.as_str())))
            .unwrap_or_default()
            .into_iter()
            .map(|s| pb::IceServer {
                urls: vec![s.url],
                username: s.username,
                credential: s.credential,
            })
            .collect();
        let display_name: String = join
            .display_name
            .chars()
            .filter(|c| !c.is_control())
            .take(DISPLAY_NAME_CHARS_MAX)
            .collect();

        // A resume token gives an earlier viewer session back while its state is in the window.
        let mut resumed: Option<ViewerState> = None;
        if !join.resume_token.is_empty() {
            resumed = match self
                .ctx
                .resume_state(&join.resume_token, room.as_str(), &identity.0)
                .await
            {
                Ok(state) => state,
                Err(refused @ super::ResumeRefused::Mismatch) => {
                    return Err(Refusal::new(Code::Forbidden, refused.to_string()));
                }
                Err(refused) => return Err(Refusal::new(Code::BadRequest, refused.to_string())),
            };
        }
        let viewer = match &resumed {
            Some(state) => state.viewer.as_str().to_string(),
            None => SessionId::generate().to_string(),
        };
        let resume_token = self.ctx.resume.sign(&ResumeClaims {
            viewer: viewer.clone(),
            room: room.to_string(),
            identity: identity.0.clone(),
        });
        let registration = self.ctx.register(&viewer);
        let (notice_tx, notice_rx) = mpsc::channel(mediamesh_actors::room::WATCH_QUEUE_MAX);
        let mut joined = Joined {
            room: room.clone(),
            identity,
            viewer: viewer.clone(),
            role,
            publisher: None,
            subscriber: None,
            selection: None,
            layer: None,
            muted: [false; 2],
            position_ms: 0,
            notices: None,
            persist: None,
            persister: None,
            registration,
            resume_token: resume_token.clone(),
            region: (!join.region.is_empty())
                .then(|| join.region.clone())
                .or_else(|| self.region.clone())
                .or_else(|| claims.region.clone()),
            display_name: mediamesh_actors::pii::shown_name(&display_name, self.ctx.mask_names),
            session: SessionId::generate().to_string(),
            generation: resumed.as_ref().map_or(0, |state| state.generation.saturating_add(1)),
        };
        if let Some(state) = &resumed {
            joined.selection = (!state.subscriptions.is_empty()).then(|| state.subscriptions.clone());
            joined.layer = state.layers.get("video").and_then(|l| parse_layer(l).ok().flatten());
            joined.position_ms = state.position_ms;
        }
        if role.subscribe {
            let (tx, rx) = watch::channel(None);
            joined.persister = Some(tokio::spawn(persist_viewer(
                self.ctx.store.clone(),
                rx,
                joined.registration.cancelled.clone(),
            )));
            joined.persist = Some(tx);
        }
        tracing::info!(
            room = %room,
            viewer = %viewer,
            identity = %Pii::Identity(&joined.identity.0),
            display_name = %Pii::Name(&display_name),
            resumed = resumed.is_some(),
            "signal session joined"
        );
        let subscriptions = joined.selection.clone().unwrap_or_default();
        let layer = joined
            .layer
            .map(|l| LAYER_NAMES[usize::from(l)].to_string())
            .unwrap_or_default();
        let position_ms = joined.position_ms;
        self.joined = Some(joined);
        self.persist();
        // Joined without a room to watch is no session: the client should try elsewhere.
        let tracks = match self.watch(notice_tx, notice_rx).await {
            Ok(tracks) => tracks,
            Err(WatchError::Moved(host)) => return Ok(moved(host, resume_token)),
            Err(WatchError::Refused(refusal)) => return Err(refusal.fatal()),
        };
        Ok(Out::Joined(pb::Joined {
            session: viewer,
            resume_token,
            ice_servers,
            resumed: resumed.is_some(),
            subscriptions,
            layer,
            position_ms,
            node: self.ctx.node_id.clone(),
            tracks: tracks.iter().map(track_message).collect(),
            idle_timeout_ms: u32::try_from(self.ctx.idle_timeout.as_millis()).unwrap_or(u32::MAX),
            resume_window_ms: u32::try_from(self.ctx.resume_window.as_millis()).unwrap_or(u32::MAX),
            alternates: self
                .ctx
                .alternates((!join.region.is_empty()).then_some(join.region.as_str())),
        }))
    }

    /// Hands the current viewer state to the persister (subscribers only).
    fn persist(&self) {
        if let Some(joined) = &self.joined
            && let Some(persist) = &joined.persist
        {
            persist.send_replace(Some(joined.viewer_state(&self.ctx.node_id)));
        }
    }

    /// Watches the room's tracks: its notices come to this session from now on.
    async fn watch(
        &mut self,
        notice_tx: mpsc::Sender<RoomNotice>,
        notice_rx: mpsc::Receiver<RoomNotice>,
    ) -> Result<Vec<TrackInfo>, WatchError> {
        let viewer = SessionId(self.joined()?.viewer.clone());
        let addr = self.room_addr().await?;
        let reply = addr
            .send(Traced::here(RoomRequest::Watch {
                watcher: viewer,
                notices: notice_tx,
            }))
            .await
            .map_err(|_| Refusal::from(RoomError::Closing))?
            .map_err(Refusal::from)?;
        self.joined()?.notices = Some(notice_rx);
        match reply {
            RoomReply::Tracks(tracks) => Ok(tracks),
            _ => Ok(Vec::new()),
        }
    }

    async fn room_tracks(&mut self) -> Result<Vec<TrackInfo>, Refusal> {
        match self.room_request(RoomRequest::Tracks).await? {
            RoomReply::Tracks(tracks) => Ok(tracks),
            _ => Ok(Vec::new()),
        }
    }

    /// The session's room, located (or placed, by the session's region preference) for what
    /// the session does there: a publishing session whose room is hosted elsewhere is `Moved`.
    async fn room_addr(&mut self) -> Result<actix::Addr<mediamesh_actors::room::Room>, WatchError> {
        let joined = self.joined()?;
        let access = if joined.role.publish {
            Access::Publish
        } else {
            Access::View
        };
        let (room, region) = (joined.room.clone(), joined.region.clone());
        match self.ctx.rooms.get_or_create(&room, access, region.as_deref()).await {
            Ok(addr) => Ok(addr),
            Err(RoomError::Elsewhere(host)) => Err(WatchError::Moved(host)),
            Err(error) => Err(WatchError::Refused(error.into())),
        }
    }

    /// Sends a request to the room, creating it (or a fresh one, if it was closing) as needed,
    /// and re-watching it when the room this session watched has closed.
    async fn room_request(&mut self, request: RoomRequest) -> Result<RoomReply, Refusal> {
        let rewatch = self.joined.as_ref().is_some_and(|j| j.notices.is_none()) && !is_watch(&request);
        let addr = self.room_addr().await?;
        // A room that stopped between the lookup and the send refuses the message: the client
        // retries (the next lookup makes a fresh room).
        let reply = addr
            .send(Traced::here(request))
            .await
            .map_err(|_| RoomError::Closing)??;
        if rewatch {
            let (tx, rx) = mpsc::channel(mediamesh_actors::room::WATCH_QUEUE_MAX);
            let viewer = SessionId(self.joined()?.viewer.clone());
            let watch = RoomRequest::Watch {
                watcher: viewer,
                notices: tx,
            };
            if addr.send(watch).await.is_ok() {
                self.joined()?.notices = Some(rx);
            }
        }
        Ok(reply)
    }

    async fn offer(&mut self, offer: pb::SessionDescription) -> Result<Out, Refusal> {
        let kind = parse_target(&offer.target)?;
        let joined = self.joined()?;
        let (allowed, existing) = match kind {
            SessionKind::Publisher => (joined.role.publish, joined.publisher.is_some()),
            SessionKind::Subscriber => (joined.role.subscribe, joined.subscriber.is_some()),
        };
        require(allowed, &format!("offer for {}", target_name(kind)))?;
        if existing {
            return Err(Refusal::new(
                Code::OutOfOrder,
                format!(
                    "the {} connection is already negotiated; trickle or ICE-restart it, or leave and join again",
                    target_name(kind)
                ),
            ));
        }
        mediamesh_actors::sdp::validate_offer(&offer.sdp).map_err(|e| Refusal::new(Code::BadRequest, e))?;
        let identity = joined.identity.clone();
        let request = match kind {
            SessionKind::Publisher => RoomRequest::Publish {
                identity,
                offer: offer.sdp,
            },
            SessionKind::Subscriber => RoomRequest::Subscribe {
                identity,
                offer: offer.sdp,
                layer: joined.layer,
                tracks: joined.selection.clone(),
            },
        };
        let RoomReply::Answer(answer) = self.room_request(request).await? else {
            return Err(Refusal::new(Code::Internal, "the room gave no answer"));
        };
        let joined = self.joined()?;
        match kind {
            SessionKind::Publisher => {
                joined.publisher = Some(answer.session.clone());
                let muted = joined.muted;
                for kind in [MediaKind::Audio, MediaKind::Video] {
                    if muted[kind.index()] {
                        self.room_request(RoomRequest::Mute {
                            session: answer.session.clone(),
                            kind,
                            muted: true,
                        })
                        .await?;
                    }
                }
            }
            SessionKind::Subscriber => joined.subscriber = Some(answer.session.clone()),
        }
        Ok(Out::Answer(pb::SessionDescription {
            target: target_name(kind).to_string(),
            sdp: answer.sdp,
        }))
    }

    async fn trickle(&mut self, trickle: pb::Trickle) -> Result<Option<Out>, Refusal> {
        let kind = parse_target(&trickle.target)?;
        let joined = self.joined()?;
        let session = match kind {
            SessionKind::Publisher => joined.publisher.clone(),
            SessionKind::Subscriber => joined.subscriber.clone(),
        }
        .ok_or_else(|| {
            Refusal::new(
                Code::OutOfOrder,
                format!("trickle for {} before its offer", target_name(kind)),
            )
        })?;
        let reply = self
            .room_request(RoomRequest::Patch {
                kind,
                session,
                if_match: None,
                fragment: trickle.fragment,
            })
            .await?;
        Ok(match reply {
            RoomReply::Patched(outcome) => match outcome.restart_fragment {
                Some(fragment) => Some(Out::Trickle(pb::Trickle {
                    target: target_name(kind).to_string(),
                    fragment,
                })),
                None => Some(Out::Ack(pb::Ack {})),
            },
            _ => Some(Out::Ack(pb::Ack {})),
        })
    }

    async fn select(&mut self, selection: Option<Vec<String>>) -> Result<Option<Out>, Refusal> {
        let joined = self.joined()?;
        joined.selection = selection.clone();
        let subscriber = joined.subscriber.clone();
        self.persist();
        if let Some(session) = subscriber {
            self.room_request(RoomRequest::Select {
                session,
                tracks: selection,
            })
            .await?;
        }
        Ok(Some(Out::Ack(pb::Ack {})))
    }

    async fn on_notice(&mut self, notice: Option<RoomNotice>) -> Flow {
        let body = match notice {
            Some(RoomNotice::Moved(host)) => {
                let resume_token = self.joined.as_ref().map(|j| j.resume_token.clone()).unwrap_or_default();
                tracing::debug!(to = %host.node, "room moved; client sent there");
                self.send(0, moved(host, resume_token)).await;
                return Flow::Moved;
            }
            Some(RoomNotice::Published(track)) => Out::TrackPublished(pb::TrackPublished {
                track: Some(track_message(&track)),
            }),
            Some(RoomNotice::Unpublished(track_id)) => Out::TrackUnpublished(pb::TrackUnpublished { track_id }),
            Some(RoomNotice::Muted { track_id, muted }) => Out::TrackMuted(pb::TrackMuted { track_id, muted }),
            None => {
                // The room closed (or dropped this watcher); the next request re-watches.
                if let Some(joined) = self.joined.as_mut() {
                    joined.notices = None;
                }
                return Flow::Continue;
            }
        };
        self.send(0, body).await;
        Flow::Continue
    }

    /// Ends the media sessions and the watch; keeps the viewer state for a resume unless the
    /// client left.
    async fn end(mut self, flow: Flow) {
        let left = flow == Flow::Leave;
        let Some(mut joined) = self.joined.take() else { return };
        if let Some(addr) = self.ctx.rooms.get(&joined.room) {
            let sessions = [
                (SessionKind::Publisher, joined.publisher.take()),
                (SessionKind::Subscriber, joined.subscriber.take()),
            ];
            let sessions: Vec<_> = sessions
                .into_iter()
                .filter_map(|(kind, session)| session.map(|s| (kind, s)))
                .collect();
            let end = {
                let addr = addr.clone();
                async move {
                    for (kind, session) in sessions {
                        let _ = addr.send(RoomRequest::End { kind, session }).await;
                    }
                }
            };
            if flow == Flow::Moved {
                tokio::spawn(async move {
                    tokio::time::sleep(MOVE_GRACE).await;
                    end.await;
                });
            } else {
                end.await;
            }
            let _ = addr
                .send(RoomRequest::Unwatch {
                    watcher: SessionId(joined.viewer.clone()),
                })
                .await;
        }
        self.ctx.unregister(&joined.viewer, &joined.registration);
        let persist = joined.persist.take();
        let persister = joined.persister.take();
        let viewer_id = mediamesh_cluster::ViewerId::new(joined.viewer.clone());
        if let (Some(persist), Some(persister)) = (persist, persister) {
            if !left && flow != Flow::Replaced {
                // The window counts from the drop: write the state once more, now.
                persist.send_replace(Some(joined.viewer_state(&self.ctx.node_id)));
            }
            drop(persist);
            let _ = tokio::time::timeout(FINAL_PERSIST_TIMEOUT, persister).await;
        }
        if left && let Err(error) = self.ctx.store.delete_viewer(viewer_id).await {
            tracing::debug!(%error, "viewer state of a leaving viewer not deleted; it expires");
        }
        tracing::info!(room = %joined.room, viewer = %joined.viewer, left, "signal session ended");
    }
}

/// Why watching the room failed.
enum WatchError {
    /// The room is hosted elsewhere and this session publishes: the client goes there.
    Moved(Host),
    Refused(Refusal),
}

impl From<Refusal> for WatchError {
    fn from(refusal: Refusal) -> Self {
        WatchError::Refused(refusal)
    }
}

impl From<WatchError> for Refusal {
    fn from(error: WatchError) -> Self {
        match error {
            WatchError::Moved(host) => RoomError::Elsewhere(host).into(),
            WatchError::Refused(refusal) => refusal,
        }
    }
}

/// `moved` to `host`, with the session's resume token.
fn moved(host: Host, resume_token: String) -> Out {
    Out::Moved(pb::Moved {
        url: host.http_url,
        resume_token,
    })
}

fn is_watch(request: &RoomRequest) -> bool {
    matches!(request, RoomRequest::Watch { .. })
}

fn require(allowed: bool, what: &str) -> Result<(), Refusal> {
    if allowed {
        Ok(())
    } else {
        Err(Refusal::new(
            Code::Forbidden,
            format!("{what} is not allowed by this session's role"),
        ))
    }
}

/// Writes each new viewer state to the store in order, coalescing bursts; flushes the last one
/// when the session drops its sender.
///
/// When the store answers with another session's state, another session owns the viewer: a
/// resume elsewhere took it over, or this session was a resume that lost the claim to another
/// resume of the same state. The persister then cancels `replaced` (the session ends with
/// `replaced`, and a client still there resumes again, from the owner's state) and writes no
/// more.
async fn persist_viewer(
    store: mediamesh_cluster::Store,
    mut states: watch::Receiver<Option<ViewerState>>,
    replaced: CancellationToken,
) {
    // `changed` still reports a value sent just before the sender went away.
    while states.changed().await.is_ok() {
        let state = states.borrow_and_update().clone();
        let Some(state) = state else { continue };
        let session = state.session.clone();
        match store.upsert_viewer(state).await {
            Ok(stored) if stored.session != session => {
                tracing::info!(
                    viewer = %stored.viewer,
                    generation = stored.generation,
                    "viewer state taken over by another session"
                );
                replaced.cancel();
                return;
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "viewer state not written"),
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("joined", &self.joined.as_ref().map(|j| j.viewer.as_str()))
            .finish()
    }
}

type InboundQueue = (mpsc::Sender<Inbound>, mpsc::Receiver<Inbound>);
type OutboundQueue = (mpsc::Sender<pb::ServerMessage>, mpsc::Receiver<pb::ServerMessage>);

/// The two bounded queues between a transport and its session.
pub fn channels() -> (InboundQueue, OutboundQueue) {
    (mpsc::channel(QUEUE_MAX), mpsc::channel(QUEUE_MAX))
}

/// A client message's name in traces.
fn message_name(body: &In) -> &'static str {
    match body {
        In::Ping(_) => "signal.ping",
        In::Join(_) => "signal.join",
        In::Offer(_) => "signal.offer",
        In::Answer(_) => "signal.answer",
        In::Trickle(_) => "signal.trickle",
        In::Subscribe(_) => "signal.subscribe",
        In::Unsubscribe(_) => "signal.unsubscribe",
        In::SetLayer(_) => "signal.set_layer",
        In::Mute(_) => "signal.mute",
        In::Position(_) => "signal.position",
        In::Leave(_) => "signal.leave",
    }
}
