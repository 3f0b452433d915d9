//! The Room actor: the sessions of one room on this node, which published track each
//! subscriber slot forwards, and the room's limits. It handles control events only.

use crate::ids::{Identity, NodeId, RoomId, SessionId};
use crate::media::codec::Codec;
use crate::media::engine::MediaError;
use crate::media::track::{MediaKind, PublishedTrack};
use crate::peer::{PatchOutcome, PatchSession, PeerEvents, StopSession};
use crate::publisher::Publisher;
use crate::registry::{RoomContext, RoomRegistry};
use crate::subscriber::{SlotControl, SlotHandle, SubscribeRequest, Subscriber};
use actix::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

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

#[derive(Debug, Clone, Serialize)]
pub struct RoomInfo {
    pub room: String,
    pub node: String,
    pub epoch: u64,
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
    },
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

pub enum RoomReply {
    Answer(SessionAnswer),
    Patched(PatchOutcome),
    Ended,
    Info(RoomInfo),
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
}

struct PublisherEntry {
    addr: Addr<Publisher>,
    events: Arc<PeerEvents>,
    identity: Identity,
    etag: String,
    /// The video codec its answer chose, known before its first packet.
    answered_video: Option<(Codec, String)>,
    tracks: Vec<Arc<PublishedTrack>>,
}

struct SubscriberEntry {
    addr: Addr<Subscriber>,
    events: Arc<PeerEvents>,
    identity: Identity,
    etag: String,
    slots: Vec<SlotHandle>,
}

pub struct Room {
    id: RoomId,
    epoch: u64,
    registry: Arc<RoomRegistry>,
    context: Arc<RoomContext>,
    /// Ordered by session id, which is time-ordered (UUIDv7): the oldest publisher first.
    publishers: BTreeMap<SessionId, PublisherEntry>,
    subscribers: BTreeMap<SessionId, SubscriberEntry>,
    /// Sessions being negotiated; they count against the limits and keep the room open.
    pending_publishers: usize,
    pending_subscribers: usize,
}

impl Room {
    pub fn new(id: RoomId, epoch: u64, registry: Arc<RoomRegistry>) -> Self {
        let context = Arc::clone(registry.context());
        Self {
            id,
            epoch,
            registry,
            context,
            publishers: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            pending_publishers: 0,
            pending_subscribers: 0,
        }
    }

    fn node(&self) -> &NodeId {
        &self.context.node
    }

    fn is_empty(&self) -> bool {
        self.publishers.is_empty()
            && self.subscribers.is_empty()
            && self.pending_publishers == 0
            && self.pending_subscribers == 0
    }

    fn stop_if_empty(&self, ctx: &mut Context<Self>) {
        if self.is_empty() {
            ctx.stop();
        }
    }

    /// The track a subscriber's slot of `kind` should forward: the oldest publisher's.
    fn source(&self, kind: MediaKind) -> Option<Arc<PublishedTrack>> {
        self.publishers
            .values()
            .flat_map(|p| p.tracks.iter())
            .find(|t| t.kind == kind)
            .cloned()
    }

    /// The video codec a new viewer should be offered: the source track's, or, before any video
    /// packet arrived, what the oldest publisher's answer chose.
    fn video_codec(&self) -> Option<(Codec, String)> {
        self.source(MediaKind::Video)
            .map(|t| (t.codec, t.fmtp.clone()))
            .or_else(|| self.publishers.values().find_map(|p| p.answered_video.clone()))
    }

    fn bind_slot(slot: &SlotHandle, track: Option<&Arc<PublishedTrack>>) {
        let command = match track {
            Some(track) if track.codec == slot.codec => SlotControl::Bind(Arc::clone(track)),
            Some(track) => {
                tracing::debug!(have = ?slot.codec, published = ?track.codec, "viewer cannot take this codec");
                SlotControl::Unbind
            }
            None => SlotControl::Unbind,
        };
        if slot.control.try_send(command).is_err() {
            tracing::warn!("subscriber slot control queue full; bind dropped");
        }
    }

    /// Re-binds every subscriber slot of `kind` after the room's source for it changed.
    fn rebind(&self, kind: MediaKind) {
        let source = self.source(kind);
        for subscriber in self.subscribers.values() {
            for slot in subscriber.slots.iter().filter(|s| s.kind == kind) {
                Self::bind_slot(slot, source.as_ref());
            }
        }
    }

    fn remove_session(&mut self, session: &SessionId) -> bool {
        if let Some(publisher) = self.publishers.remove(session) {
            tracing::info!(room = %self.id, session = %session, "publisher session ended");
            stop_session(&publisher.addr);
            let kinds: Vec<MediaKind> = publisher.tracks.iter().map(|t| t.kind).collect();
            for kind in kinds {
                self.rebind(kind);
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
            epoch: self.epoch,
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
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        tracing::info!(room = %self.id, epoch = self.epoch, "room closed");
        let session_ids: Vec<SessionId> = self.publishers.keys().chain(self.subscribers.keys()).cloned().collect();
        for session in session_ids {
            self.remove_session(&session);
        }
        self.registry.closed(&self.id, &ctx.address(), self.epoch);
    }
}

impl Handler<RoomRequest> for Room {
    type Result = ActorResponse<Self, Result<RoomReply, RoomError>>;

    fn handle(&mut self, msg: RoomRequest, ctx: &mut Self::Context) -> Self::Result {
        let context = Arc::clone(&self.context);
        let room = ctx.address();
        match msg {
            RoomRequest::Publish { identity, offer } => {
                let max = context.limits.publishers_per_room_max;
                if self.publishers.len() + self.pending_publishers >= max {
                    return ActorResponse::reply(Err(RoomError::RoomFull("publishers", max)));
                }
                let permit = match context.reserve_session() {
                    Ok(permit) => permit,
                    Err(error) => return ActorResponse::reply(Err(error)),
                };
                self.pending_publishers += 1;
                let negotiate =
                    context
                        .ingress_runtime
                        .spawn(Publisher::negotiate(Arc::clone(&context), room, offer, permit));
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
                            },
                        );
                        RoomReply::Answer(answer)
                    });
                    room.stop_if_empty(ctx);
                    reply
                }))
            }
            RoomRequest::Subscribe { identity, offer, layer } => {
                let max = context.limits.subscribers_per_room_max;
                if self.subscribers.len() + self.pending_subscribers >= max {
                    return ActorResponse::reply(Err(RoomError::RoomFull("subscribers", max)));
                }
                let permit = match context.reserve_session() {
                    Ok(permit) => permit,
                    Err(error) => return ActorResponse::reply(Err(error)),
                };
                self.pending_subscribers += 1;
                let video_source = self.video_codec();
                let request = SubscribeRequest {
                    offer,
                    layer,
                    video_source,
                };
                let negotiate =
                    context
                        .media_runtime
                        .spawn(Subscriber::negotiate(Arc::clone(&context), room, request, permit));
                ActorResponse::r#async(negotiate.into_actor(self).map(move |joined, room, ctx| {
                    room.pending_subscribers -= 1;
                    let result = joined.unwrap_or_else(|e| Err(RoomError::Media(MediaError::WebRtc(e.to_string()))));
                    let reply = result.map(|negotiated| {
                        for slot in &negotiated.slots {
                            Room::bind_slot(slot, room.source(slot.kind).as_ref());
                        }
                        room.subscribers.insert(
                            negotiated.answer.session.clone(),
                            SubscriberEntry {
                                events: negotiated.subscriber.events(),
                                addr: negotiated.subscriber.start(),
                                identity,
                                etag: negotiated.answer.etag.clone(),
                                slots: negotiated.slots,
                            },
                        );
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
        }
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
                let kind = track.kind;
                if self.source(kind).is_some_and(|s| Arc::ptr_eq(&s, &track)) {
                    self.rebind(kind);
                }
            }
            RoomEvent::TrackUnpublished { session, track } => {
                if let Some(publisher) = self.publishers.get_mut(&session) {
                    publisher.tracks.retain(|t| !Arc::ptr_eq(t, &track));
                    self.rebind(track.kind);
                }
            }
            RoomEvent::SessionClosed { session } => {
                tracing::debug!(room = %self.id, session = %session, "connection closed");
                self.remove_session(&session);
                self.stop_if_empty(ctx);
            }
        }
    }
}
