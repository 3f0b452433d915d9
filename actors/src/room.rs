//! The Room actor: the sessions of one room on this node, which published track each
//! subscriber slot forwards, and the room's limits. It handles control events only.

use crate::ids::{Identity, NodeId, RoomId, SessionId};
use crate::media::codec::Codec;
use crate::media::engine::MediaError;
use crate::media::track::{MediaKind, PublishedTrack};
use crate::peer::{PatchOutcome, PatchSession, PeerEvents, StopSession};
use crate::ports::{FenceVerdict, Host, RelayGuard};
use crate::publisher::Publisher;
use crate::registry::{RoomContext, RoomRegistry};
use crate::subscriber::{SlotControl, SlotHandle, SubscribeRequest, Subscriber};
use actix::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::Instrument;

/// Mailbox bound of a room; requests beyond it wait (`send`) or are refused (`try_send`).
pub const ROOM_MAILBOX_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("this node is at its limit of {1} {0}")]
    NodeFull(&'static str, usize),
    #[error("the room is at its limit of {1} {0}")]
    RoomFull(&'static str, usize),
    #[error("malformed SDP offer: {0}")]
    BadOffer(String),
    #[error("malformed trickle-ICE fragment: {0}")]
    BadFragment(String),
    #[error("no such session in this room")]
    UnknownSession,
    #[error("the ETag does not match the session's ICE session")]
    PreconditionFailed,
    #[error("media: {0}")]
    Media(MediaError),
    #[error("room directory: {0}")]
    Directory(String),
    #[error("the room is closing; retry")]
    Closing,
    /// The room is hosted on another node: publish there.
    #[error("the room is hosted on node {}", .0.node)]
    Elsewhere(Host),
}

/// Whether a room is hosted on this node or relayed here from its host.
#[derive(Debug, Clone)]
pub enum RoomMode {
    /// This node hosts the room under `epoch`: publishers come here.
    Host { epoch: u64 },
    /// `host` hosts it; this node pulls its tracks for the viewers here.
    Relay { host: Host },
}

/// When a relay switches hosts, the old relay runs this long next to the new one.
const RELAY_OVERLAP: std::time::Duration = std::time::Duration::from_secs(2);

/// A track pulled from another node.
struct RelayedTrack {
    info: TrackInfo,
    track: Arc<PublishedTrack>,
    /// The node its publisher is on.
    origin: NodeId,
}

/// What a room tells another node's relay about the tracks it may pull from here.
#[derive(Debug, Clone)]
pub enum RelayNotice {
    Published {
        info: TrackInfo,
        track: Arc<PublishedTrack>,
        origin: NodeId,
    },
    Unpublished(String),
    Muted {
        track_id: String,
        muted: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Publisher,
    Subscriber,
}

#[derive(Debug, Clone)]
pub struct SessionAnswer {
    pub session: SessionId,
    pub sdp: String,
    pub etag: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub session: String,
    pub identity: String,
    pub connected: bool,
    pub tracks: usize,
}

/// A published track as clients see it (the signal protocol's `Track`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrackInfo {
    /// `<publisher session>/<track id>`: unique in the room.
    pub id: String,
    pub kind: &'static str,
    pub codec: &'static str,
    pub layers: Vec<String>,
    pub muted: bool,
    pub publisher: String,
}

/// What a room tells its watchers (signal sessions) about its tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomNotice {
    Published(TrackInfo),
    Unpublished(String),
    Muted {
        track_id: String,
        muted: bool,
    },
    /// The room moved to another host: clients of this node should go there (they resume).
    Moved(Host),
}

/// Bound of a watcher's notice queue; a watcher that lets it fill up is dropped.
pub const WATCH_QUEUE_MAX: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct RoomInfo {
    pub room: String,
    pub node: String,
    pub epoch: u64,
    /// Whether this node hosts the room (else it relays it from the host).
    pub hosted: bool,
    /// Tracks pulled from other nodes.
    pub relayed_tracks: usize,
    /// Signal sessions watching the room here.
    pub watchers: usize,
    pub publishers: Vec<SessionInfo>,
    pub subscribers: Vec<SessionInfo>,
}

/// Requests from the edge; every one must be answered.
#[derive(Message)]
#[rtype(result = "Result<RoomReply, RoomError>")]
pub enum RoomRequest {
    Publish {
        identity: Identity,
        offer: String,
    },
    Subscribe {
        identity: Identity,
        offer: String,
        layer: Option<u8>,
        /// Track ids to forward; `None` for the room's default tracks.
        tracks: Option<Vec<String>>,
    },
    /// Changes which tracks a subscriber's connection forwards (`None`: the defaults).
    Select {
        session: SessionId,
        tracks: Option<Vec<String>>,
    },
    /// Changes the simulcast layer a subscriber's connection prefers (`None`: automatic).
    SetLayer {
        session: SessionId,
        layer: Option<u8>,
    },
    /// Mutes or unmutes a publisher's tracks of one kind: its viewers stop getting them.
    Mute {
        session: SessionId,
        kind: MediaKind,
        muted: bool,
    },
    /// Subscribes `watcher` to the room's track notices; answers with the tracks now.
    Watch {
        watcher: SessionId,
        notices: tokio::sync::mpsc::Sender<RoomNotice>,
    },
    Unwatch {
        watcher: SessionId,
    },
    /// Another node's relay: the tracks it may pull from here now, then notices of changes.
    /// Keeps the room open while it watches.
    RelayWatch {
        watcher: SessionId,
        requester: NodeId,
        notices: tokio::sync::mpsc::Sender<RelayNotice>,
    },
    RelayUnwatch {
        watcher: SessionId,
    },
    /// One track another node may pull from here (by room-wide id).
    RelayTrack {
        requester: NodeId,
        track_id: String,
    },
    /// The directory names this node the host under `epoch`.
    Promote {
        epoch: u64,
    },
    /// `host` now hosts the room: this node's clients are told to move and the room relays.
    Demote {
        host: Host,
    },
    /// Keeps an empty room open until `until` (a room made for a handoff waits for its clients).
    Hold {
        until: std::time::Instant,
    },
    /// The node drains: signal sessions of a relayed room are told to move to the host.
    Evacuate,
    /// Ends every session and closes the room.
    Close,
    /// The room's tracks now.
    Tracks,
    Patch {
        kind: SessionKind,
        session: SessionId,
        if_match: Option<String>,
        fragment: String,
    },
    End {
        kind: SessionKind,
        session: SessionId,
    },
    Info,
}

impl RoomRequest {
    /// The request's name in traces.
    pub fn name(&self) -> &'static str {
        match self {
            RoomRequest::Publish { .. } => "room.publish",
            RoomRequest::Subscribe { .. } => "room.subscribe",
            RoomRequest::Select { .. } => "room.select",
            RoomRequest::SetLayer { .. } => "room.set_layer",
            RoomRequest::Mute { .. } => "room.mute",
            RoomRequest::Watch { .. } => "room.watch",
            RoomRequest::Unwatch { .. } => "room.unwatch",
            RoomRequest::RelayWatch { .. } => "room.relay_watch",
            RoomRequest::RelayUnwatch { .. } => "room.relay_unwatch",
            RoomRequest::RelayTrack { .. } => "room.relay_track",
            RoomRequest::Promote { .. } => "room.promote",
            RoomRequest::Demote { .. } => "room.demote",
            RoomRequest::Hold { .. } => "room.hold",
            RoomRequest::Evacuate => "room.evacuate",
            RoomRequest::Close => "room.close",
            RoomRequest::Tracks => "room.tracks",
            RoomRequest::Patch { .. } => "room.patch",
            RoomRequest::End { .. } => "room.end",
            RoomRequest::Info => "room.info",
        }
    }
}

/// A [`RoomRequest`] with the sender's span: the room's handling, and the negotiation it
/// spawns, join the sender's trace.
pub struct Traced(pub RoomRequest, pub tracing::Span);

impl Traced {
    /// `request` in the current span.
    pub fn here(request: RoomRequest) -> Self {
        Self(request, tracing::Span::current())
    }
}

impl Message for Traced {
    type Result = Result<RoomReply, RoomError>;
}

pub enum RoomReply {
    Answer(SessionAnswer),
    Patched(PatchOutcome),
    Ended,
    Info(RoomInfo),
    Tracks(Vec<TrackInfo>),
    /// Tracks another node may pull, with their origin nodes.
    Relayable(Vec<RelayNotice>),
    Track(Arc<PublishedTrack>),
    Done,
}

/// Events from the room's own sessions; every one must be delivered (sent with `send`).
#[derive(Message)]
#[rtype(result = "()")]
pub enum RoomEvent {
    TrackPublished {
        session: SessionId,
        track: Arc<PublishedTrack>,
    },
    TrackUnpublished {
        session: SessionId,
        track: Arc<PublishedTrack>,
    },
    SessionClosed {
        session: SessionId,
    },
    /// A track pulled from another node opened (`info.id` is the room-wide id).
    RelayPublished {
        info: TrackInfo,
        track: Arc<PublishedTrack>,
        origin: NodeId,
    },
    /// A pulled track ended.
    RelayUnpublished {
        track: Arc<PublishedTrack>,
    },
    RelayMuted {
        track_id: String,
        muted: bool,
    },
}

struct PublisherEntry {
    addr: Addr<Publisher>,
    events: Arc<PeerEvents>,
    identity: Identity,
    etag: String,
    /// The video codec its answer chose, known before its first packet.
    answered_video: Option<(Codec, String)>,
    tracks: Vec<Arc<PublishedTrack>>,
    /// Muted kinds, indexed by [`MediaKind::index`].
    muted: [bool; 2],
}

struct SubscriberEntry {
    addr: Addr<Subscriber>,
    events: Arc<PeerEvents>,
    identity: Identity,
    etag: String,
    slots: Vec<SlotHandle>,
    /// Track ids chosen by the viewer; `None` for the room's default tracks.
    selection: Option<Vec<String>>,
    /// The viewer's time counts while the entry lives.
    _usage: crate::ports::UsageGuard,
}

fn kind_name(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    }
}

fn track_id(session: &SessionId, track: &PublishedTrack) -> String {
    format!("{session}/{}", track.id)
}

pub struct Room {
    id: RoomId,
    mode: RoomMode,
    registry: Arc<RoomRegistry>,
    context: Arc<RoomContext>,
    /// Ordered by session id, which is time-ordered (UUIDv7): the oldest publisher first.
    publishers: BTreeMap<SessionId, PublisherEntry>,
    subscribers: BTreeMap<SessionId, SubscriberEntry>,
    /// Sessions being negotiated; they count against the limits and keep the room open.
    pending_publishers: usize,
    pending_subscribers: usize,
    /// Signal sessions told about track changes; they keep the room open.
    watchers: BTreeMap<SessionId, tokio::sync::mpsc::Sender<RoomNotice>>,
    /// Tracks pulled from other nodes, by room-wide id.
    relays: BTreeMap<String, RelayedTrack>,
    /// Other nodes' relays pulling from here; they keep the room open.
    relay_watchers: BTreeMap<SessionId, (NodeId, tokio::sync::mpsc::Sender<RelayNotice>)>,
    /// The relay pulling this room's tracks from its host (relay mode, and a promoted room
    /// until its last source ends).
    follow: Option<RelayGuard>,
    /// An empty room stays open until then.
    hold_until: Option<std::time::Instant>,
    /// A fence check is waiting for the directory (which may be placing the room again, at the
    /// store's pace): the next one waits for it.
    fence_checking: bool,
}

impl Room {
    pub fn new(id: RoomId, mode: RoomMode, registry: Arc<RoomRegistry>) -> Self {
        let context = Arc::clone(registry.context());
        Self {
            id,
            mode,
            registry,
            context,
            publishers: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            pending_publishers: 0,
            pending_subscribers: 0,
            watchers: BTreeMap::new(),
            relays: BTreeMap::new(),
            relay_watchers: BTreeMap::new(),
            follow: None,
            hold_until: None,
            fence_checking: false,
        }
    }

    /// The epoch under which this node hosts the room (`None`: it relays).
    fn hosted_epoch(&self) -> Option<u64> {
        match &self.mode {
            RoomMode::Host { epoch } => Some(*epoch),
            RoomMode::Relay { .. } => None,
        }
    }

    fn epoch(&self) -> u64 {
        match &self.mode {
            RoomMode::Host { epoch } => *epoch,
            RoomMode::Relay { host } => host.epoch,
        }
    }

    /// Whether `requester` may pull a track of `origin` from `node`: a node never gets its own
    /// tracks back, and only the host serves tracks it relays itself (so relays form no loop).
    fn servable(node: &NodeId, hosted: bool, origin: &NodeId, requester: &NodeId) -> bool {
        origin != requester && (origin == node || hosted)
    }

    /// The relayed tracks `requester` may pull from here now.
    fn relayed_notices<'a>(&'a self, requester: &'a NodeId) -> impl Iterator<Item = RelayNotice> + 'a {
        let hosted = self.hosted_epoch().is_some();
        self.relays
            .values()
            .filter(move |r| Self::servable(self.node(), hosted, &r.origin, requester))
            .map(|r| RelayNotice::Published {
                info: r.info.clone(),
                track: Arc::clone(&r.track),
                origin: r.origin.clone(),
            })
    }

    /// The tracks `requester` may pull from here now: this node's publishers', then relayed ones.
    fn relayable(&self, requester: &NodeId) -> Vec<RelayNotice> {
        let node = self.node();
        let local = self
            .publishers
            .iter()
            .filter(|_| Self::servable(node, true, node, requester))
            .flat_map(|(session, p)| {
                p.tracks.iter().map(move |t| RelayNotice::Published {
                    info: Self::track_info(session, p, t),
                    track: Arc::clone(t),
                    origin: node.clone(),
                })
            });
        local.chain(self.relayed_notices(requester)).collect()
    }

    /// Tells every relay watcher allowed to see a track of `origin`; one whose queue is full or
    /// closed is dropped (its stream ends and the other node pulls again).
    fn notify_relays(&mut self, origin: Option<&NodeId>, notice: RelayNotice) {
        let node = self.node().clone();
        let hosted = self.hosted_epoch().is_some();
        self.relay_watchers.retain(|watcher, (requester, queue)| {
            if let Some(origin) = origin
                && !Self::servable(&node, hosted, origin, requester)
            {
                return true;
            }
            match queue.try_send(notice.clone()) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(watcher = %watcher, "relay notices not read; relay dropped");
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Becomes the host under `epoch`.
    fn promote(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        if self.hosted_epoch().is_some_and(|current| current >= epoch) {
            return;
        }
        let was_relay = self.hosted_epoch().is_none();
        tracing::info!(room = %self.id, epoch, "room hosted here");
        self.mode = RoomMode::Host { epoch };
        self.registry.set_hosted(&self.id, &ctx.address(), true);
        if was_relay {
            // Relayed tracks become servable to the other nodes' relays.
            for (requester, queue) in self.relay_watchers.values() {
                for notice in self.relayed_notices(requester) {
                    let _ = queue.try_send(notice);
                }
            }
        }
    }

    /// Another node hosts the room now: clients here are told to move, and the room relays.
    fn demote(&mut self, host: Host, ctx: &mut Context<Self>) {
        let Some(epoch) = self.hosted_epoch() else {
            if let RoomMode::Relay { host: current } = &mut self.mode
                && host.epoch >= current.epoch
            {
                *current = host;
            }
            return;
        };
        if host.epoch < epoch {
            return;
        }
        tracing::info!(room = %self.id, epoch, to = %host.node, new_epoch = host.epoch, "room moved; relaying from its new host");
        self.mode = RoomMode::Relay { host: host.clone() };
        self.registry.set_hosted(&self.id, &ctx.address(), false);
        let not_own: Vec<String> = self
            .relays
            .iter()
            .filter(|(_, r)| r.origin != *self.node())
            .map(|(id, _)| id.clone())
            .collect();
        for id in not_own {
            self.notify_relays(None, RelayNotice::Unpublished(id));
        }
        self.notify(RoomNotice::Moved(host));
        if self.follow.is_none() {
            self.follow = Some(self.registry.relay().follow(self.id.clone(), ctx.address()));
        }
    }

    /// Asks the directory what the room's mode should be (its fence rule compares the mode with
    /// this node's replica): a host whose epoch went stale demotes itself, a relay still pulling
    /// from a host the directory no longer names starts over from the new one (so no viewer gets
    /// media from two hosts), and this node named at a newer epoch takes the room over. The rule
    /// lives with the cluster (`mediamesh_cluster::mesh::fence`), where the simulator runs it too;
    /// the room only carries the verdict out.
    fn check_fence(&mut self, ctx: &mut Context<Self>) {
        if self.fence_checking {
            return;
        }
        self.fence_checking = true;
        let verdict = self.registry.directory().fence(self.id.clone(), self.mode.clone());
        ctx.spawn(verdict.into_actor(self).map(|verdict, room, ctx| {
            room.fence_checking = false;
            match verdict {
                Ok(FenceVerdict::Keep) => {}
                Ok(FenceVerdict::Promote { epoch }) => room.promote(epoch, ctx),
                Ok(FenceVerdict::Demote(host)) => room.demote(host, ctx),
                Ok(FenceVerdict::Follow(host)) => {
                    // The verdict is about the mode the check started from: a room promoted or
                    // moved on meanwhile is left as it is (the next check looks again).
                    let RoomMode::Relay { host: followed } = &room.mode else {
                        return;
                    };
                    if followed.epoch >= host.epoch {
                        return;
                    }
                    tracing::info!(room = %room.id, from = %followed.node, to = %host.node, "room host changed; relaying from the new one");
                    room.mode = RoomMode::Relay { host };
                    // Make-before-break: the new host's copies replace the old ones track by
                    // track (same room-wide ids); the old relay stops a little later.
                    let old = room.follow.replace(room.registry.relay().follow(room.id.clone(), ctx.address()));
                    ctx.run_later(RELAY_OVERLAP, move |_, _| drop(old));
                }
                Err(error) => tracing::debug!(room = %room.id, %error, "fence check failed"),
            }
        }));
    }

    fn node(&self) -> &NodeId {
        &self.context.node
    }

    fn is_empty(&self) -> bool {
        self.publishers.is_empty()
            && self.subscribers.is_empty()
            && self.pending_publishers == 0
            && self.pending_subscribers == 0
            && self.watchers.is_empty()
            && self.relay_watchers.is_empty()
    }

    fn stop_if_empty(&self, ctx: &mut Context<Self>) {
        let held = self.hold_until.is_some_and(|until| std::time::Instant::now() < until);
        if self.is_empty() && !held {
            ctx.stop();
        }
    }

    /// Every published track that is not muted, with its room-wide id: this node's, oldest
    /// publisher first, then the tracks relayed from other nodes, those published on the host
    /// first. A publisher that moves to the host (make-before-break) thus takes every viewer
    /// over from its old copy with its first keyframe, while the old copy still flows.
    fn live_tracks(&self) -> impl Iterator<Item = (String, &Arc<PublishedTrack>)> {
        let host = match &self.mode {
            RoomMode::Relay { host } => Some(&host.node),
            RoomMode::Host { .. } => None,
        };
        let live = self.relays.iter().filter(|(_, r)| !r.info.muted);
        let relayed = live
            .clone()
            .filter(move |(_, r)| host == Some(&r.origin))
            .chain(live.filter(move |(_, r)| host != Some(&r.origin)))
            .map(|(id, r)| (id.clone(), &r.track));
        let local = self.publishers.iter().flat_map(|(session, publisher)| {
            publisher
                .tracks
                .iter()
                .filter(|t| !publisher.muted[t.kind.index()])
                .map(move |t| (track_id(session, t), t))
        });
        local.chain(relayed)
    }

    /// The track a viewer's slot of `kind` should forward: the first of its chosen tracks that is
    /// live, or without a choice the oldest publisher's.
    fn source_for(&self, kind: MediaKind, selection: Option<&[String]>) -> Option<Arc<PublishedTrack>> {
        let mut live = self.live_tracks().filter(|(_, t)| t.kind == kind);
        match selection {
            None => live.next().map(|(_, t)| Arc::clone(t)),
            Some(chosen) => {
                let live: Vec<_> = live.collect();
                chosen
                    .iter()
                    .find_map(|id| live.iter().find(|(live_id, _)| live_id == id))
                    .map(|(_, t)| Arc::clone(t))
            }
        }
    }

    fn source(&self, kind: MediaKind) -> Option<Arc<PublishedTrack>> {
        self.source_for(kind, None)
    }

    /// The video codec a new viewer should be offered: the source track's, or, before any video
    /// packet arrived, what the oldest publisher's answer chose.
    fn video_codec(&self) -> Option<(Codec, String)> {
        self.source(MediaKind::Video)
            .map(|t| (t.codec, t.fmtp.clone()))
            .or_else(|| self.publishers.values().find_map(|p| p.answered_video.clone()))
    }

    /// Points a slot at `track`; nothing is sent when it already forwards it.
    fn bind_slot(slot: &mut SlotHandle, track: Option<Arc<PublishedTrack>>) {
        let track = track.filter(|track| {
            let fits = track.codec == slot.codec;
            if !fits {
                tracing::debug!(have = ?slot.codec, published = ?track.codec, "viewer cannot take this codec");
            }
            fits
        });
        let unchanged = match (&slot.bound, &track) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        let command = match &track {
            Some(track) => SlotControl::Bind(Arc::clone(track)),
            None => SlotControl::Unbind,
        };
        if slot.control.try_send(command).is_err() {
            tracing::warn!("subscriber slot control queue full; bind dropped");
            return;
        }
        slot.bound = track;
    }

    /// Re-binds the slots of `kind` of every viewer after the tracks changed.
    fn rebind(&mut self, kind: MediaKind) {
        // Viewers without a choice, most of them, share one source: found once.
        let default = self.source(kind);
        let sources: Vec<(SessionId, Option<Arc<PublishedTrack>>)> = self
            .subscribers
            .iter()
            .map(|(session, s)| {
                let source = match s.selection.as_deref() {
                    None => default.clone(),
                    Some(selection) => self.source_for(kind, Some(selection)),
                };
                (session.clone(), source)
            })
            .collect();
        for (session, source) in sources {
            self.bind_subscriber(&session, kind, source);
        }
    }

    fn rebind_subscriber(&mut self, session: &SessionId, kind: MediaKind) {
        let Some(selection) = self.subscribers.get(session).map(|s| s.selection.clone()) else {
            return;
        };
        let source = self.source_for(kind, selection.as_deref());
        self.bind_subscriber(session, kind, source);
    }

    fn bind_subscriber(&mut self, session: &SessionId, kind: MediaKind, source: Option<Arc<PublishedTrack>>) {
        if let Some(subscriber) = self.subscribers.get_mut(session) {
            for slot in subscriber.slots.iter_mut().filter(|s| s.kind == kind) {
                Self::bind_slot(slot, source.clone());
            }
        }
    }

    fn track_infos(&self) -> Vec<TrackInfo> {
        let relayed = self.relays.values().map(|r| r.info.clone());
        relayed
            .chain(
                self.publishers
                    .iter()
                    .flat_map(|(session, p)| p.tracks.iter().map(move |t| Self::track_info(session, p, t))),
            )
            .collect()
    }

    fn track_info(session: &SessionId, publisher: &PublisherEntry, track: &PublishedTrack) -> TrackInfo {
        TrackInfo {
            id: track_id(session, track),
            kind: kind_name(track.kind),
            codec: track.codec.mime_type(),
            layers: track.rids.clone(),
            muted: publisher.muted[track.kind.index()],
            publisher: session.to_string(),
        }
    }

    /// Tells every watcher; one whose queue is full or closed is dropped (it re-watches).
    fn notify(&mut self, notice: RoomNotice) {
        self.watchers
            .retain(|watcher, queue| match queue.try_send(notice.clone()) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(watcher = %watcher, "room notices not read; watcher dropped");
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn remove_session(&mut self, session: &SessionId) -> bool {
        if let Some(publisher) = self.publishers.remove(session) {
            tracing::info!(room = %self.id, session = %session, "publisher session ended");
            stop_session(&publisher.addr);
            let node = self.node().clone();
            for track in &publisher.tracks {
                self.notify(RoomNotice::Unpublished(track_id(session, track)));
                self.notify_relays(Some(&node), RelayNotice::Unpublished(track_id(session, track)));
                self.rebind(track.kind);
            }
            return true;
        }
        if let Some(subscriber) = self.subscribers.remove(session) {
            tracing::info!(room = %self.id, session = %session, "subscriber session ended");
            stop_session(&subscriber.addr);
            return true;
        }
        false
    }

    fn info(&self) -> RoomInfo {
        RoomInfo {
            room: self.id.to_string(),
            node: self.node().to_string(),
            epoch: self.epoch(),
            hosted: self.hosted_epoch().is_some(),
            relayed_tracks: self.relays.len(),
            watchers: self.watchers.len(),
            publishers: self
                .publishers
                .iter()
                .map(|(session, p)| SessionInfo {
                    session: session.to_string(),
                    identity: p.identity.to_string(),
                    connected: p.events.is_connected(),
                    tracks: p.tracks.len(),
                })
                .collect(),
            subscribers: self
                .subscribers
                .iter()
                .map(|(session, s)| SessionInfo {
                    session: session.to_string(),
                    identity: s.identity.to_string(),
                    connected: s.events.is_connected(),
                    tracks: s.slots.len(),
                })
                .collect(),
        }
    }
}

/// What a room's actor says about itself (`None` when it stopped).
pub async fn room_info(addr: &Addr<Room>) -> Option<RoomInfo> {
    match addr.send(RoomRequest::Info).await {
        Ok(Ok(RoomReply::Info(info))) => Some(info),
        _ => None,
    }
}

/// Stops a session actor. A control event that must not be lost: sent with `send`, which waits
/// for mailbox room; a stopped actor's `Drop` also closes its connection.
fn stop_session<A>(addr: &Addr<A>)
where
    A: Actor<Context = Context<A>> + Handler<StopSession>,
{
    let addr = addr.clone();
    tokio::spawn(async move {
        let _ = addr.send(StopSession).await;
    });
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(ROOM_MAILBOX_MAX);
        if let RoomMode::Relay { host } = &self.mode {
            tracing::info!(room = %self.id, host = %host.node, epoch = host.epoch, "room relayed from its host");
            self.follow = Some(self.registry.relay().follow(self.id.clone(), ctx.address()));
        }
        ctx.run_interval(self.registry.directory().fence_interval(), |room, ctx| {
            room.check_fence(ctx);
            if room.hold_until.is_some() {
                room.stop_if_empty(ctx);
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        tracing::info!(room = %self.id, epoch = self.epoch(), "room closed");
        self.follow = None;
        let session_ids: Vec<SessionId> = self.publishers.keys().chain(self.subscribers.keys()).cloned().collect();
        for session in session_ids {
            self.remove_session(&session);
        }
        self.registry.closed(&self.id, &ctx.address(), self.hosted_epoch());
    }
}

impl Handler<RoomRequest> for Room {
    type Result = ActorResponse<Self, Result<RoomReply, RoomError>>;

    fn handle(&mut self, msg: RoomRequest, ctx: &mut Self::Context) -> Self::Result {
        let context = Arc::clone(&self.context);
        let room = ctx.address();
        match msg {
            RoomRequest::Publish { identity, offer } => {
                if let RoomMode::Relay { host } = &self.mode {
                    return ActorResponse::reply(Err(RoomError::Elsewhere(host.clone())));
                }
                let max = context.limits.publishers_per_room_max;
                if self.publishers.len() + self.pending_publishers >= max {
                    return ActorResponse::reply(Err(RoomError::RoomFull("publishers", max)));
                }
                let permit = match context.reserve_session() {
                    Ok(permit) => permit,
                    Err(error) => return ActorResponse::reply(Err(error)),
                };
                self.pending_publishers += 1;
                let negotiate = context
                    .ingress_runtime
                    .spawn(Publisher::negotiate(Arc::clone(&context), room, offer, permit).in_current_span());
                ActorResponse::r#async(negotiate.into_actor(self).map(move |joined, room, ctx| {
                    room.pending_publishers -= 1;
                    let result = joined.unwrap_or_else(|e| Err(RoomError::Media(MediaError::WebRtc(e.to_string()))));
                    let reply = result.map(|(publisher, answer)| {
                        let events = publisher.events();
                        room.publishers.insert(
                            answer.session.clone(),
                            PublisherEntry {
                                addr: publisher.start(),
                                events,
                                identity,
                                etag: answer.etag.clone(),
                                answered_video: crate::sdp::answered_video_codec(&answer.sdp),
                                tracks: Vec::new(),
                                muted: [false; 2],
                            },
                        );
                        RoomReply::Answer(answer)
                    });
                    room.stop_if_empty(ctx);
                    reply
                }))
            }
            RoomRequest::Subscribe {
                identity,
                offer,
                layer,
                tracks,
            } => {
                let max = context.limits.subscribers_per_room_max;
                if self.subscribers.len() + self.pending_subscribers >= max {
                    return ActorResponse::reply(Err(RoomError::RoomFull("subscribers", max)));
                }
                let permit = match context.reserve_session() {
                    Ok(permit) => permit,
                    Err(error) => return ActorResponse::reply(Err(error)),
                };
                self.pending_subscribers += 1;
                let video_source = self
                    .source_for(MediaKind::Video, tracks.as_deref())
                    .map(|t| (t.codec, t.fmtp.clone()))
                    .or_else(|| self.video_codec());
                let request = SubscribeRequest {
                    offer,
                    layer,
                    video_source,
                };
                let negotiate = context
                    .media_runtime
                    .spawn(Subscriber::negotiate(Arc::clone(&context), room, request, permit).in_current_span());
                ActorResponse::r#async(negotiate.into_actor(self).map(move |joined, room, ctx| {
                    room.pending_subscribers -= 1;
                    let result = joined.unwrap_or_else(|e| Err(RoomError::Media(MediaError::WebRtc(e.to_string()))));
                    let reply = result.map(|negotiated| {
                        let session = negotiated.answer.session.clone();
                        room.subscribers.insert(
                            session.clone(),
                            SubscriberEntry {
                                events: negotiated.subscriber.events(),
                                addr: negotiated.subscriber.start(),
                                identity,
                                etag: negotiated.answer.etag.clone(),
                                slots: negotiated.slots,
                                selection: tracks,
                                _usage: context.usage.begin(&room.id, &session),
                            },
                        );
                        room.rebind_subscriber(&session, MediaKind::Video);
                        room.rebind_subscriber(&session, MediaKind::Audio);
                        RoomReply::Answer(negotiated.answer)
                    });
                    room.stop_if_empty(ctx);
                    reply
                }))
            }
            RoomRequest::Patch {
                kind,
                session,
                if_match,
                fragment,
            } => {
                let etag = match kind {
                    SessionKind::Publisher => self.publishers.get(&session).map(|p| p.etag.clone()),
                    SessionKind::Subscriber => self.subscribers.get(&session).map(|s| s.etag.clone()),
                };
                let Some(etag) = etag else {
                    return ActorResponse::reply(Err(RoomError::UnknownSession));
                };
                if if_match.as_deref().is_some_and(|m| m != "*" && m != etag) {
                    return ActorResponse::reply(Err(RoomError::PreconditionFailed));
                }
                let patched = match kind {
                    SessionKind::Publisher => {
                        let addr = self.publishers.get(&session).map(|p| p.addr.clone());
                        futures::future::Either::Left(async move {
                            let addr = addr.ok_or(RoomError::UnknownSession)?;
                            addr.send(PatchSession { fragment })
                                .await
                                .map_err(|_| RoomError::UnknownSession)?
                        })
                    }
                    SessionKind::Subscriber => {
                        let addr = self.subscribers.get(&session).map(|s| s.addr.clone());
                        futures::future::Either::Right(async move {
                            let addr = addr.ok_or(RoomError::UnknownSession)?;
                            addr.send(PatchSession { fragment })
                                .await
                                .map_err(|_| RoomError::UnknownSession)?
                        })
                    }
                };
                ActorResponse::r#async(patched.into_actor(self).map(move |result, room, _ctx| {
                    let outcome = result?;
                    match kind {
                        SessionKind::Publisher => {
                            if let Some(p) = room.publishers.get_mut(&session) {
                                p.etag.clone_from(&outcome.etag);
                            }
                        }
                        SessionKind::Subscriber => {
                            if let Some(s) = room.subscribers.get_mut(&session) {
                                s.etag.clone_from(&outcome.etag);
                            }
                        }
                    }
                    Ok(RoomReply::Patched(outcome))
                }))
            }
            RoomRequest::End { kind, session } => {
                let exists = match kind {
                    SessionKind::Publisher => self.publishers.contains_key(&session),
                    SessionKind::Subscriber => self.subscribers.contains_key(&session),
                };
                let reply = if exists && self.remove_session(&session) {
                    Ok(RoomReply::Ended)
                } else {
                    Err(RoomError::UnknownSession)
                };
                self.stop_if_empty(ctx);
                ActorResponse::reply(reply)
            }
            RoomRequest::Info => ActorResponse::reply(Ok(RoomReply::Info(self.info()))),
            RoomRequest::Select { session, tracks } => {
                let Some(subscriber) = self.subscribers.get_mut(&session) else {
                    return ActorResponse::reply(Err(RoomError::UnknownSession));
                };
                subscriber.selection = tracks;
                self.rebind_subscriber(&session, MediaKind::Video);
                self.rebind_subscriber(&session, MediaKind::Audio);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::SetLayer { session, layer } => {
                let Some(subscriber) = self.subscribers.get(&session) else {
                    return ActorResponse::reply(Err(RoomError::UnknownSession));
                };
                for slot in subscriber.slots.iter().filter(|s| s.kind == MediaKind::Video) {
                    if slot.control.try_send(SlotControl::SetLayer(layer)).is_err() {
                        tracing::warn!("subscriber slot control queue full; layer change dropped");
                    }
                }
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Mute { session, kind, muted } => {
                let Some(publisher) = self.publishers.get_mut(&session) else {
                    return ActorResponse::reply(Err(RoomError::UnknownSession));
                };
                if publisher.muted[kind.index()] != muted {
                    publisher.muted[kind.index()] = muted;
                    let ids: Vec<String> = publisher
                        .tracks
                        .iter()
                        .filter(|t| t.kind == kind)
                        .map(|t| track_id(&session, t))
                        .collect();
                    let node = self.node().clone();
                    for track_id in ids {
                        self.notify(RoomNotice::Muted {
                            track_id: track_id.clone(),
                            muted,
                        });
                        self.notify_relays(Some(&node), RelayNotice::Muted { track_id, muted });
                    }
                    self.rebind(kind);
                }
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Watch { watcher, notices } => {
                self.watchers.insert(watcher, notices);
                ActorResponse::reply(Ok(RoomReply::Tracks(self.track_infos())))
            }
            RoomRequest::Tracks => ActorResponse::reply(Ok(RoomReply::Tracks(self.track_infos()))),
            RoomRequest::RelayWatch {
                watcher,
                requester,
                notices,
            } => {
                let now = self.relayable(&requester);
                self.relay_watchers.insert(watcher, (requester, notices));
                ActorResponse::reply(Ok(RoomReply::Relayable(now)))
            }
            RoomRequest::RelayUnwatch { watcher } => {
                self.relay_watchers.remove(&watcher);
                self.stop_if_empty(ctx);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::RelayTrack { requester, track_id } => {
                let found = self.relayable(&requester).into_iter().find_map(|notice| match notice {
                    RelayNotice::Published { info, track, .. } if info.id == track_id => Some(track),
                    _ => None,
                });
                ActorResponse::reply(found.map(RoomReply::Track).ok_or(RoomError::UnknownSession))
            }
            RoomRequest::Promote { epoch } => {
                self.promote(epoch, ctx);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Demote { host } => {
                self.demote(host, ctx);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Hold { until } => {
                self.hold_until = Some(until);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Evacuate => {
                if let RoomMode::Relay { host } = &self.mode {
                    let host = host.clone();
                    self.notify(RoomNotice::Moved(host));
                }
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Close => {
                ctx.stop();
                ActorResponse::reply(Ok(RoomReply::Done))
            }
            RoomRequest::Unwatch { watcher } => {
                self.watchers.remove(&watcher);
                self.stop_if_empty(ctx);
                ActorResponse::reply(Ok(RoomReply::Done))
            }
        }
    }
}

impl Handler<Traced> for Room {
    type Result = ActorResponse<Self, Result<RoomReply, RoomError>>;

    fn handle(&mut self, Traced(request, parent): Traced, ctx: &mut Self::Context) -> Self::Result {
        let span = tracing::info_span!(parent: &parent, "room", otel.name = request.name(), room = %self.id, epoch = i64::try_from(self.epoch()).unwrap_or(i64::MAX));
        let _entered = span.enter();
        <Self as Handler<RoomRequest>>::handle(self, request, ctx)
    }
}

impl Handler<RoomEvent> for Room {
    type Result = ();

    fn handle(&mut self, msg: RoomEvent, ctx: &mut Self::Context) {
        match msg {
            RoomEvent::TrackPublished { session, track } => {
                let Some(publisher) = self.publishers.get_mut(&session) else {
                    return; // the session ended while its track opened
                };
                publisher.tracks.push(Arc::clone(&track));
                let info = Self::track_info(&session, publisher, &track);
                self.notify(RoomNotice::Published(info.clone()));
                let node = self.node().clone();
                let relayed = RelayNotice::Published {
                    info,
                    track: Arc::clone(&track),
                    origin: node.clone(),
                };
                self.notify_relays(Some(&node), relayed);
                self.rebind(track.kind);
            }
            RoomEvent::TrackUnpublished { session, track } => {
                if let Some(publisher) = self.publishers.get_mut(&session) {
                    publisher.tracks.retain(|t| !Arc::ptr_eq(t, &track));
                    self.notify(RoomNotice::Unpublished(track_id(&session, &track)));
                    let node = self.node().clone();
                    self.notify_relays(Some(&node), RelayNotice::Unpublished(track_id(&session, &track)));
                    self.rebind(track.kind);
                }
            }
            RoomEvent::SessionClosed { session } => {
                tracing::debug!(room = %self.id, session = %session, "connection closed");
                self.remove_session(&session);
                self.stop_if_empty(ctx);
            }
            RoomEvent::RelayPublished { info, track, origin } => {
                if origin == *self.node() {
                    return; // never our own track back
                }
                let id = info.id.clone();
                let kind = track.kind;
                self.notify(RoomNotice::Published(info.clone()));
                self.notify_relays(
                    Some(&origin),
                    RelayNotice::Published {
                        info: info.clone(),
                        track: Arc::clone(&track),
                        origin: origin.clone(),
                    },
                );
                self.relays.insert(id, RelayedTrack { info, track, origin });
                self.rebind(kind);
            }
            RoomEvent::RelayUnpublished { track } => {
                let found = self
                    .relays
                    .iter()
                    .find(|(_, r)| Arc::ptr_eq(&r.track, &track))
                    .map(|(id, _)| id.clone());
                if let Some(id) = found
                    && let Some(gone) = self.relays.remove(&id)
                {
                    self.notify(RoomNotice::Unpublished(id.clone()));
                    self.notify_relays(Some(&gone.origin), RelayNotice::Unpublished(id));
                    self.rebind(gone.track.kind);
                }
            }
            RoomEvent::RelayMuted { track_id, muted } => {
                let Some(relayed) = self.relays.get_mut(&track_id) else {
                    return;
                };
                if relayed.info.muted == muted {
                    return;
                }
                relayed.info.muted = muted;
                let (kind, origin) = (relayed.track.kind, relayed.origin.clone());
                self.notify(RoomNotice::Muted {
                    track_id: track_id.clone(),
                    muted,
                });
                self.notify_relays(Some(&origin), RelayNotice::Muted { track_id, muted });
                self.rebind(kind);
            }
        }
    }
}
