//! The media relay between nodes. A node with viewers of a room hosted elsewhere follows the
//! room's host: it watches the host's room (`WatchRoom`) and pulls each track with one
//! `PullTrack` stream, however many local viewers it has; the pulled packets feed a local
//! [`PublishedTrack`], so local viewers are served exactly as from a local publisher (GOP
//! cache, layers, keyframe requests, which go upstream with `RequestKeyframe`).

use super::Mesh;
use actix::Addr;
use mediamesh_actors::media::codec::Codec;
use mediamesh_actors::media::track::{ForwardPacket, PublishedTrack, Sink};
use mediamesh_actors::ports::{Location, RelayGuard, RelaySource};
use mediamesh_actors::room::{RelayNotice, Room, RoomEvent, RoomReply, RoomRequest};
use mediamesh_actors::{Access, NodeId, RoomError, RoomId, SessionId, TrackInfo};
use mediamesh_proto::mesh::v1 as pb;
use rtc::shared::marshal::{Marshal, Unmarshal};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events queued per relay watch stream before the watcher is dropped.
const WATCH_QUEUE_MAX: usize = 64;
/// Keyframe requests queued per pulled track (idempotent: extra ones are dropped).
const KEYFRAME_QUEUE_MAX: usize = 16;
/// A keyframe request upstream gives up after this long.
const KEYFRAME_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Re-locating the host after a relay ended waits at least this, doubling up to the maximum.
const FOLLOW_BACKOFF_MIN: Duration = Duration::from_millis(50);
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a room waits for another node's relay to get its tracks.
const ROOM_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The [`RelaySource`] of this node.
pub struct Relay(pub Arc<Mesh>);

impl RelaySource for Relay {
    fn follow(&self, room: RoomId, into: Addr<Room>) -> RelayGuard {
        let token = CancellationToken::new();
        let mesh = Arc::clone(&self.0);
        let cancelled = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = follow(mesh, room, into) => {}
                _ = cancelled.cancelled() => {}
            }
        });
        Box::new(token.drop_guard())
    }
}

/// Pulls `room` from whoever hosts it until this node hosts it (or the room stops).
async fn follow(mesh: Arc<Mesh>, room: RoomId, into: Addr<Room>) {
    let mut backoff = FOLLOW_BACKOFF_MIN;
    loop {
        if !into.connected() {
            return;
        }
        let Ok(registry) = mesh.registry() else { return };
        let located = registry.directory().locate(room.clone(), None).await;
        match located {
            Ok(Location::Here { epoch }) => {
                let _ = into.send(RoomRequest::Promote { epoch }).await;
                return;
            }
            Ok(Location::There(host)) => {
                let _ = into.send(RoomRequest::Demote { host: host.clone() }).await;
                let started = Instant::now();
                match pull_room(&mesh, &room, &host.node.0, &into).await {
                    Ok(()) => tracing::debug!(room = %room, host = %host.node, "relay ended"),
                    Err(error) => tracing::debug!(room = %room, host = %host.node, %error, "relay failed"),
                }
                if started.elapsed() > FOLLOW_BACKOFF_MAX * 5 {
                    backoff = FOLLOW_BACKOFF_MIN;
                }
            }
            Err(error) => tracing::debug!(room = %room, %error, "room host unknown"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(FOLLOW_BACKOFF_MAX);
    }
}

/// Sends `RelayUnpublished` for its track when the pull ends, however it ends.
struct Unpublish {
    room: Addr<Room>,
    track: Arc<PublishedTrack>,
    mesh: Arc<Mesh>,
}

impl Drop for Unpublish {
    fn drop(&mut self) {
        self.mesh.stats.streams_in.fetch_sub(1, Ordering::Relaxed);
        let room = self.room.clone();
        let track = Arc::clone(&self.track);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ROOM_SEND_TIMEOUT, room.send(RoomEvent::RelayUnpublished { track })).await;
        });
    }
}

/// Watches `room` on `from` and pulls every track it announces, until the watch ends.
async fn pull_room(mesh: &Arc<Mesh>, room: &RoomId, from: &str, into: &Addr<Room>) -> Result<(), String> {
    let mut client = mesh.client(from)?;
    let request = pb::WatchRoomRequest {
        room: room.to_string(),
        requester: mesh.node.clone(),
    };
    let mut events = client
        .watch_room(request)
        .await
        .map_err(|status| status.message().to_string())?
        .into_inner();
    // The pulls end with this function however it ends (also when the follow is cancelled).
    let mut running = tokio::task::JoinSet::new();
    let mut pulls: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    loop {
        let event = match events.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(status) => return Err(status.message().to_string()),
        };
        match event.body {
            Some(pb::room_event::Body::Published(track)) => {
                let id = track.id.clone();
                let task = running.spawn(pull_track(
                    Arc::clone(mesh),
                    client.clone(),
                    room.clone(),
                    track,
                    into.clone(),
                ));
                if let Some(old) = pulls.insert(id, task) {
                    old.abort();
                }
            }
            Some(pb::room_event::Body::Unpublished(id)) => {
                if let Some(task) = pulls.remove(&id) {
                    task.abort();
                }
            }
            Some(pb::room_event::Body::Muted(muted)) => {
                let event = RoomEvent::RelayMuted {
                    track_id: muted.track_id,
                    muted: muted.muted,
                };
                let _ = into.send(event).await;
            }
            None => {}
        }
        // Reap the pulls that ended by themselves.
        while running.try_join_next().is_some() {}
    }
}

/// The room-side description of a pulled track (`None` for a codec this node does not forward).
fn track_info(track: &pb::RelayTrack) -> Option<(TrackInfo, Codec)> {
    let codec = Codec::from_mime(&track.codec)?;
    let info = TrackInfo {
        id: track.id.clone(),
        kind: if codec.is_video() { "video" } else { "audio" },
        codec: codec.mime_type(),
        layers: track.layers.clone(),
        muted: track.muted,
        publisher: track.publisher.clone(),
    };
    Some((info, codec))
}

/// Pulls one track into a local [`PublishedTrack`] until its stream ends.
async fn pull_track(mesh: Arc<Mesh>, mut client: super::Client, room: RoomId, track: pb::RelayTrack, into: Addr<Room>) {
    let Some((info, codec)) = track_info(&track) else {
        tracing::warn!(codec = %track.codec, "relayed track with an unsupported codec ignored");
        return;
    };
    if track.layers.len() > mediamesh_actors::media::layer::LAYERS_MAX {
        return;
    }
    let request = pb::PullTrackRequest {
        room: room.to_string(),
        track_id: track.id.clone(),
        requester: mesh.node.clone(),
    };
    let mut packets = match client.pull_track(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::debug!(room = %room, error = %status.message(), "track pull refused");
            return;
        }
    };
    let (keyframe_tx, mut keyframe_rx) = mpsc::channel::<u32>(KEYFRAME_QUEUE_MAX);
    let published = Arc::new(PublishedTrack::new(
        track.id.clone(),
        codec,
        track.fmtp.clone(),
        u16::try_from(track.channels).unwrap_or(0),
        track.layers.clone(),
        keyframe_tx,
        Arc::clone(&mesh.counters),
    ));
    mesh.stats.streams_in.fetch_add(1, Ordering::Relaxed);
    let _unpublish = Unpublish {
        room: into.clone(),
        track: Arc::clone(&published),
        mesh: Arc::clone(&mesh),
    };
    let event = RoomEvent::RelayPublished {
        info,
        track: Arc::clone(&published),
        origin: NodeId(track.origin.clone()),
    };
    if tokio::time::timeout(ROOM_SEND_TIMEOUT, into.send(event)).await.is_err() {
        return;
    }
    // A made-up SSRC per layer: keyframe requests name a layer by it (see `request_keyframe`).
    let layer_ssrc = |layer: u32| 0x4d4d_0000 | layer;
    let mut seen_layers = 0u8;
    loop {
        tokio::select! {
            message = packets.message() => {
                let mut packet = match message {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(room = %room, error = %status.message(), "track pull ended");
                        break;
                    }
                };
                let Ok(layer) = u8::try_from(packet.layer) else { continue };
                if usize::from(layer) >= published.layer_count() {
                    continue;
                }
                let Ok(rtp) = rtc::rtp::Packet::unmarshal(&mut packet.rtp) else { continue };
                if seen_layers & (1 << layer) == 0 {
                    seen_layers |= 1 << layer;
                    published.set_layer_ssrc(layer, layer_ssrc(u32::from(layer)));
                }
                mesh.stats.packets_in.fetch_add(1, Ordering::Relaxed);
                published.ingest(layer, rtp, Instant::now());
            }
            Some(ssrc) = keyframe_rx.recv() => {
                let request = pb::KeyframeRequest {
                    room: room.to_string(),
                    track_id: track.id.clone(),
                    layer: ssrc & 0xff,
                    requester: mesh.node.clone(),
                };
                let mut client = client.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(KEYFRAME_CALL_TIMEOUT, client.request_keyframe(request)).await;
                });
            }
        }
    }
}

// ---- serving side ----

/// The room another node wants to pull from: the one here, or, when none exists, the room
/// hosted here (created for the watch). A room neither here nor hosted here is refused, so
/// the requester locates the host again.
async fn room_to_serve(mesh: &Mesh, room: &str) -> Result<Addr<Room>, tonic::Status> {
    let registry = mesh.registry()?;
    let room = RoomId::parse(room).ok_or_else(|| tonic::Status::invalid_argument("invalid room name"))?;
    if let Some(addr) = registry.get(&room) {
        return Ok(addr);
    }
    // The room as its host would have it: made here when this node hosts it, else refused.
    match registry.get_or_create(&room, Access::Publish, None).await {
        Ok(addr) => Ok(addr),
        Err(RoomError::Elsewhere(host)) => Err(tonic::Status::failed_precondition(format!(
            "the room is hosted on {}",
            host.node
        ))),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    }
}

fn relay_track(info: &TrackInfo, track: &PublishedTrack, origin: &NodeId) -> pb::RelayTrack {
    pb::RelayTrack {
        id: info.id.clone(),
        kind: info.kind.to_string(),
        codec: track.codec.mime_type().to_string(),
        fmtp: track.fmtp.clone(),
        channels: u32::from(track.channels),
        layers: track.rids.clone(),
        muted: info.muted,
        publisher: info.publisher.clone(),
        origin: origin.0.clone(),
    }
}

fn room_event(notice: RelayNotice) -> pb::RoomEvent {
    use pb::room_event::Body;
    let body = match notice {
        RelayNotice::Published { info, track, origin } => Body::Published(relay_track(&info, &track, &origin)),
        RelayNotice::Unpublished(id) => Body::Unpublished(id),
        RelayNotice::Muted { track_id, muted } => Body::Muted(pb::Muted { track_id, muted }),
    };
    pb::RoomEvent { body: Some(body) }
}

pub type EventStream = tokio_stream::wrappers::ReceiverStream<Result<pb::RoomEvent, tonic::Status>>;
pub type PacketStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RelayPacket, tonic::Status>> + Send>>;

/// One track stream another node pulls from here, counted while it lasts.
struct Serving(Arc<Mesh>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.stats.streams_out.fetch_sub(1, Ordering::Relaxed);
    }
}

fn relay_packet(item: &ForwardPacket) -> Option<Result<pb::RelayPacket, tonic::Status>> {
    let rtp = item.packet.marshal().ok()?;
    Some(Ok(pb::RelayPacket {
        layer: u32::from(item.layer),
        rtp: rtp.freeze(),
    }))
}

/// `WatchRoom`: the tracks `requester` may pull now, then their changes, until either side ends.
pub async fn watch_room(mesh: &Mesh, request: pb::WatchRoomRequest) -> Result<EventStream, tonic::Status> {
    let addr = room_to_serve(mesh, &request.room).await?;
    let (notices_tx, mut notices) = mpsc::channel(WATCH_QUEUE_MAX);
    let watcher = SessionId::generate();
    let reply = addr
        .send(RoomRequest::RelayWatch {
            watcher: watcher.clone(),
            requester: NodeId(request.requester),
            notices: notices_tx,
        })
        .await
        .map_err(|_| tonic::Status::unavailable("the room is closing"))?
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let RoomReply::Relayable(now) = reply else {
        return Err(tonic::Status::internal("unexpected room reply"));
    };
    let (out, rx) = mpsc::channel(WATCH_QUEUE_MAX + now.len());
    for notice in now {
        let _ = out.try_send(Ok(room_event(notice)));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                notice = notices.recv() => {
                    let Some(notice) = notice else { break };
                    if out.send(Ok(room_event(notice))).await.is_err() {
                        break;
                    }
                }
                _ = out.closed() => break,
            }
        }
        let _ = addr.send(RoomRequest::RelayUnwatch { watcher }).await;
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn served_track(
    mesh: &Mesh,
    room: &str,
    track_id: &str,
    requester: &str,
) -> Result<Arc<PublishedTrack>, tonic::Status> {
    let registry = mesh.registry()?;
    let room = RoomId::parse(room).ok_or_else(|| tonic::Status::invalid_argument("invalid room name"))?;
    let addr = registry
        .get(&room)
        .ok_or_else(|| tonic::Status::not_found("no such room here"))?;
    let reply = addr
        .send(RoomRequest::RelayTrack {
            requester: NodeId(requester.to_string()),
            track_id: track_id.to_string(),
        })
        .await
        .map_err(|_| tonic::Status::unavailable("the room is closing"))?
        .map_err(|_| tonic::Status::not_found("no such track here"))?;
    match reply {
        RoomReply::Track(track) => Ok(track),
        _ => Err(tonic::Status::internal("unexpected room reply")),
    }
}

/// `PullTrack`: every layer's cached GOP, then the live packets, until the puller goes away
/// (the track drops a sink whose stream is gone) or the track ends.
pub async fn pull(mesh: Arc<Mesh>, request: pb::PullTrackRequest) -> Result<PacketStream, tonic::Status> {
    use futures::StreamExt;
    let track = served_track(&mesh, &request.room, &request.track_id, &request.requester).await?;
    let all_layers = u8::try_from((1u16 << track.layer_count()) - 1).unwrap_or(u8::MAX);
    let (sink, packets) = Sink::new(all_layers);
    let replay = track.attach_all(sink);
    mesh.stats.streams_out.fetch_add(1, Ordering::Relaxed);
    let serving = Serving(mesh);
    let replayed = futures::stream::iter(replay).filter_map(|item| std::future::ready(relay_packet(&item)));
    let live = tokio_stream::wrappers::ReceiverStream::new(packets).filter_map(move |item| {
        serving.0.stats.packets_out.fetch_add(1, Ordering::Relaxed);
        std::future::ready(relay_packet(&item))
    });
    Ok(Box::pin(replayed.chain(live)))
}

/// `RequestKeyframe`: a viewer on another node needs a keyframe of this track.
pub async fn request_keyframe(mesh: &Mesh, request: pb::KeyframeRequest) -> Result<(), tonic::Status> {
    let track = served_track(mesh, &request.room, &request.track_id, &request.requester).await?;
    let layer = u8::try_from(request.layer).map_err(|_| tonic::Status::invalid_argument("no such layer"))?;
    track.request_keyframe(layer, Instant::now());
    Ok(())
}
