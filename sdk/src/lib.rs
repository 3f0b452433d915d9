//! mediamesh Rust SDK (WHIP/WHEP client); filled by the SDK work.
