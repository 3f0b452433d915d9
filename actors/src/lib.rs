//! mediamesh actors: Room, Publisher and Subscriber (actix), and the media plane they own
//! handles to (`media`).
//!
//! Architecture invariants:
//! - RTP never passes through an actor mailbox: packets go from a publisher's reader task
//!   through [`media::track::PublishedTrack`] into per-subscriber bounded queues.
//! - This crate knows nothing of the cluster store; it declares what it needs in [`ports`].
//! - Mailboxes are bounded; messages are sent with `try_send` or `send`, never `do_send`.

pub mod ids;
pub mod media;
pub mod peer;
pub mod pii;
pub mod ports;
pub mod publisher;
pub mod registry;
pub mod room;
pub mod sdp;
pub mod subscriber;
pub mod turn;

pub use ids::{Identity, NodeId, RoomId, SessionId};
pub use registry::{Access, NodeStats, RoomContext, RoomLimits, RoomRegistry};
pub use room::{
    RelayNotice, RoomError, RoomInfo, RoomMode, RoomNotice, SessionAnswer, SessionInfo, SessionKind, TrackInfo,
};
