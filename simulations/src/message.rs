//! What travels between simulated nodes and between clients and nodes. Node-to-node messages
//! stand for the cluster port's RPCs (`Raft`, `Propose`, the mesh's `Handoff`, `Promote`,
//! `WatchRoom`); they stay typed because serialization is not what the simulation tests.

use std::fmt;

use mediamesh_cluster::command::Command;
use mediamesh_cluster::types::ViewerState;
use mediamesh_cluster::{RoomId, ViewerId};
use raft::eraftpb::Message;

/// Index of a node in the roster.
pub type NodeIndex = usize;
/// Index of a viewer client.
pub type ClientId = usize;

/// A message between two nodes.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A raft message.
    Raft(Box<Message>),
    /// A follower forwards a proposal to the leader (`Propose` RPC).
    Forward { request: u64, commands: Vec<Command> },
    /// The leader's answer to a forwarded proposal.
    ForwardReply { request: u64, result: ForwardResult },
    /// A migration's source hands the room to the target (`Handoff` RPC). `tracks_ms` is the
    /// simulated time the target needs to relay the room's tracks (a property of the media,
    /// chosen by the world).
    Handoff {
        migration: u64,
        room: RoomId,
        epoch: u64,
        tracks_ms: u64,
    },
    /// The target's answer to a handoff.
    HandoffReply { migration: u64, result: Result<(), String> },
    /// The directory names the target the host at `epoch` (`Promote` RPC).
    Promote { migration: u64, room: RoomId, epoch: u64 },
    /// The target's answer to a promote.
    PromoteReply { migration: u64, result: Result<(), String> },
    /// A relay asks the host for the room's stream (`WatchRoom`).
    Watch { room: RoomId },
    /// The host's answer to a watch.
    WatchReply { room: RoomId, hosting: Option<u64> },
}

/// How the leader answered a forwarded proposal: the replica core's own answer.
pub use mediamesh_cluster::replica::ForwardResult;

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Raft(m) => write!(
                f,
                "raft {:?} term={} idx={} logterm={} commit={} n={} reject={}",
                m.get_msg_type(),
                m.term,
                m.index,
                m.log_term,
                m.commit,
                m.entries.len(),
                m.reject
            ),
            Payload::Forward { request, commands } => {
                write!(f, "forward #{request} [")?;
                for c in commands {
                    write!(f, "{} ", c.name())?;
                }
                write!(f, "]")
            }
            Payload::ForwardReply { request, result } => match result {
                ForwardResult::Applied(o) => write!(f, "forward-reply #{request} applied {}", o.len()),
                ForwardResult::NotLeader => write!(f, "forward-reply #{request} not-leader"),
                ForwardResult::Failed(e) => write!(f, "forward-reply #{request} failed {e}"),
            },
            Payload::Handoff {
                migration,
                room,
                epoch,
                tracks_ms,
            } => write!(f, "handoff m{migration} {room}@{epoch} tracks={tracks_ms}ms"),
            Payload::HandoffReply { migration, result } => write!(f, "handoff-reply m{migration} {result:?}"),
            Payload::Promote { migration, room, epoch } => write!(f, "promote m{migration} {room}@{epoch}"),
            Payload::PromoteReply { migration, result } => write!(f, "promote-reply m{migration} {result:?}"),
            Payload::Watch { room } => write!(f, "watch {room}"),
            Payload::WatchReply { room, hosting } => write!(f, "watch-reply {room} hosting={hosting:?}"),
        }
    }
}

/// A client's request to the node it talks to (a signal session's messages).
#[derive(Clone, Debug)]
pub enum ClientRequest {
    /// Join `room`; with `resume`, take that viewer's state back if it is within the window,
    /// else start `fresh`.
    Join {
        request: u64,
        room: RoomId,
        resume: Option<ViewerId>,
        fresh: ViewerId,
    },
    /// The playback position moved.
    Position {
        request: u64,
        viewer: ViewerId,
        position_ms: u64,
    },
    /// The connection dropped (the state stays for a resume).
    Disconnect { viewer: ViewerId },
    /// The viewer left for good (its state is deleted).
    Leave { request: u64, viewer: ViewerId },
}

/// How a resume went, as the node saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeOutcome {
    /// No resume token.
    Fresh,
    /// The state was read and is within the window: taken back.
    Resumed(ViewerState),
    /// The read succeeded but there is no state, or it is older than the window.
    Expired(Option<ViewerState>),
    /// The read failed (no quorum in time): a new session.
    Unreadable(String),
}

/// A node's answer or notice to a client.
// Moved once from the node to the client (boxed in the world's queue).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ClientReply {
    /// Joined; `acked` is the viewer state the store committed. `read_clock_ms` is the node's
    /// wall clock when it judged the resume.
    Joined {
        request: u64,
        acked: ViewerState,
        resume: ResumeOutcome,
        read_clock_ms: u64,
    },
    /// The join failed (the client retries).
    JoinFailed { request: u64, reason: String },
    /// The position write committed.
    PositionAcked { request: u64, acked: ViewerState },
    /// The position write failed or its outcome is unknown.
    PositionFailed { request: u64, reason: String },
    /// The leave committed (or failed).
    Left { request: u64, ok: bool },
    /// The session was told to move to `to` (migration, demotion, evacuation).
    Moved { viewer: ViewerId, to: NodeIndex },
    /// The node closed the session (drain deadline).
    Closed { viewer: ViewerId },
}
