//! The media plane: everything on the per-packet path. Actors own handles to these types; RTP
//! never passes through an actor mailbox.

pub mod bwe;
pub mod codec;
pub mod engine;
pub mod feedback;
pub mod gop;
pub mod histograms;
pub mod layer;
pub mod rewrite;
pub mod track;
