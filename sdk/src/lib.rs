//! mediamesh-sdk: a Rust client for mediamesh over WHIP (publish) and WHEP (play), built on
//! webrtc-rs 0.21.
//!
//! - [`whip::publish`] sends synthetic media: VP8 video at a target bitrate (frames made up
//!   without an encoder, keyframes on a schedule and on PLI/FIR) and Opus silence.
//! - [`whep::play`] receives a room's media and keeps per-track statistics: packets, bytes,
//!   loss from sequence gaps, frames, the largest gap between frames and the first-frame
//!   latency.
//!
//! - [`channel::Client`] joins a room over the node's signal channel (WebSocket or gRPC), and
//!   publishes and plays over it with the same media code; it reconnects with backoff, resumes
//!   with its resume token, and follows `moved`.
//!
//! Both negotiate without trickle ICE (all candidates are in the offer) and bind to loopback
//! unless told otherwise. Sessions end with `close()`, which DELETEs the session resource;
//! dropping a session does the same in the background.
//!
//! The pure parts — the VP8 packetizer ([`media`]) and the statistics ([`stats`]) — do no IO.

pub mod channel;
mod codecs;
pub mod error;
pub mod files;
pub mod media;
mod peer;
mod signal;
pub mod stats;
pub mod whep;
pub mod whip;

pub use channel::{Client, ClientOptions, Event, Role, Transport};
pub use error::{Error, Problem};
pub use peer::ConnectOptions;
pub use signal::default_http_client;
pub use stats::TrackStats;
pub use whep::{Layer, PlayOptions, PlaySession, PlayShared, PlayStats, play};
pub use whip::{PublishOptions, PublishSession, PublishStats, VideoCodec, publish};
