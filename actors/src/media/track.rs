//! The fan-out point of one published track: the publisher's reader task calls
//! [`PublishedTrack::ingest`] per packet; every subscriber attached to the track has a [`Sink`],
//! a bounded queue drained by its own forwarding task. No actor mailbox is on this path.

use super::codec::Codec;
use super::gop::GopCache;
use super::layer::{LAYERS_MAX, LayerView};
use parking_lot::Mutex;
use rtc::rtp;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Packets queued per subscriber track before new ones are dropped (and counted).
pub const SINK_QUEUE_PACKETS_MAX: usize = 1_024;
/// A layer with no packet for this long is considered gone.
const LAYER_ALIVE_WINDOW: Duration = Duration::from_millis(1_500);
/// Bitrate is measured over windows of this length.
const BITRATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    /// Audio 0, video 1: for per-kind arrays.
    pub fn index(self) -> usize {
        match self {
            MediaKind::Audio => 0,
            MediaKind::Video => 1,
        }
    }
}

/// One packet on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct ForwardPacket {
    pub layer: u8,
    pub keyframe_start: bool,
    pub packet: rtp::Packet,
}

/// A subscriber's end of a track.
#[derive(Debug)]
pub struct Sink {
    tx: mpsc::Sender<ForwardPacket>,
    /// Bit mask of the layers this subscriber wants now (see `LayerSelector::wanted_mask`).
    wanted_layers: AtomicU8,
}

impl Sink {
    pub fn new(wanted_layers: u8) -> (Arc<Sink>, mpsc::Receiver<ForwardPacket>) {
        let (tx, rx) = mpsc::channel(SINK_QUEUE_PACKETS_MAX);
        let sink = Arc::new(Sink {
            tx,
            wanted_layers: AtomicU8::new(wanted_layers),
        });
        (sink, rx)
    }

    pub fn set_wanted_layers(&self, mask: u8) {
        self.wanted_layers.store(mask, Ordering::Relaxed);
    }
}

/// Counters the node's metrics read; shared by every track of a node.
#[derive(Debug, Default)]
pub struct MediaCounters {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub packets_dropped: AtomicU64,
    /// Packets missing from publishers' streams: sequence gaps seen at ingress.
    pub packets_lost: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub histograms: super::histograms::MediaHistograms,
}

#[derive(Debug, Default)]
struct LayerMeter {
    ssrc: AtomicU32,
    bitrate_bps: AtomicU64,
    last_packet_ms: AtomicU64,
}

struct Inner {
    caches: [GopCache; LAYERS_MAX],
    sinks: Vec<Arc<Sink>>,
    window_start: Option<Instant>,
    window_bytes: [u64; LAYERS_MAX],
    /// Highest sequence number seen per layer, to count gaps.
    highest_sequence: [Option<u16>; LAYERS_MAX],
}

/// A track a publisher sends, with up to [`LAYERS_MAX`] simulcast layers.
pub struct PublishedTrack {
    pub id: String,
    pub kind: MediaKind,
    pub codec: Codec,
    /// The negotiated codec line of the publisher (fmtp, channels), offered to subscribers.
    pub fmtp: String,
    pub channels: u16,
    /// Layer names (rids) from lowest to highest; empty for a track without simulcast.
    pub rids: Vec<String>,
    meters: [LayerMeter; LAYERS_MAX],
    inner: Mutex<Inner>,
    keyframe_tx: mpsc::Sender<u32>,
    last_keyframe_request_ms: [AtomicU64; LAYERS_MAX],
    epoch: Instant,
    counters: Arc<MediaCounters>,
}

impl std::fmt::Debug for PublishedTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishedTrack")
            .field("id", &self.id)
            .field("codec", &self.codec)
            .finish()
    }
}

/// Minimum spacing of keyframe requests sent upstream for one layer, whoever asks.
const UPSTREAM_KEYFRAME_INTERVAL_MS: u64 = 300;

impl PublishedTrack {
    pub fn new(
        id: String,
        codec: Codec,
        fmtp: String,
        channels: u16,
        rids: Vec<String>,
        keyframe_tx: mpsc::Sender<u32>,
        counters: Arc<MediaCounters>,
    ) -> Self {
        assert!(rids.len() <= LAYERS_MAX, "rids are limited at negotiation");
        Self {
            id,
            kind: if codec.is_video() {
                MediaKind::Video
            } else {
                MediaKind::Audio
            },
            codec,
            fmtp,
            channels,
            rids,
            meters: Default::default(),
            inner: Mutex::new(Inner {
                caches: Default::default(),
                sinks: Vec::new(),
                window_start: None,
                window_bytes: [0; LAYERS_MAX],
                highest_sequence: [None; LAYERS_MAX],
            }),
            keyframe_tx,
            last_keyframe_request_ms: Default::default(),
            epoch: Instant::now(),
            counters,
        }
    }

    /// Layer index of a rid, or 0 for a track without simulcast.
    pub fn layer_of_rid(&self, rid: Option<&str>) -> Option<u8> {
        match rid {
            None | Some("") if self.rids.is_empty() => Some(0),
            Some(rid) => self.rids.iter().position(|r| r == rid).map(|i| i as u8),
            None => None,
        }
    }

    pub fn layer_count(&self) -> usize {
        self.rids.len().max(1)
    }

    pub fn set_layer_ssrc(&self, layer: u8, ssrc: u32) {
        self.meters[usize::from(layer)].ssrc.store(ssrc, Ordering::Relaxed);
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The per-packet entry point, called only by the publisher's reader task.
    pub fn ingest(&self, layer: u8, mut packet: rtp::Packet, now: Instant) {
        let layer_index = usize::from(layer);
        debug_assert!(layer_index < LAYERS_MAX);
        // Extension ids are negotiated per connection: the subscriber's sender refuses ids it
        // did not negotiate, so extensions end here.
        packet.header.extensions.clear();
        packet.header.extension = false;
        packet.header.extension_profile = 0;
        let keyframe_start = self.codec.is_keyframe_start(&packet.payload);
        let size = packet.payload.len() as u64;
        self.counters.packets_in.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(size, Ordering::Relaxed);
        let meter = &self.meters[layer_index];
        meter.last_packet_ms.store(self.now_ms(now).max(1), Ordering::Relaxed);

        let mut inner = self.inner.lock();
        let sequence = packet.header.sequence_number;
        match inner.highest_sequence[layer_index] {
            Some(highest) => {
                let ahead = sequence.wrapping_sub(highest);
                // RFC 3550 serial arithmetic: ahead by less than half the space is newer.
                if (1..0x8000).contains(&ahead) {
                    self.counters
                        .packets_lost
                        .fetch_add(u64::from(ahead - 1), Ordering::Relaxed);
                    inner.highest_sequence[layer_index] = Some(sequence);
                }
            }
            None => inner.highest_sequence[layer_index] = Some(sequence),
        }
        inner.window_bytes[layer_index] += size + 12;
        match inner.window_start {
            None => inner.window_start = Some(now),
            Some(start) if now.saturating_duration_since(start) >= BITRATE_WINDOW => {
                let elapsed = now.saturating_duration_since(start).as_secs_f64();
                for (meter, bytes) in self.meters.iter().zip(inner.window_bytes.iter_mut()) {
                    meter
                        .bitrate_bps
                        .store((*bytes as f64 * 8.0 / elapsed) as u64, Ordering::Relaxed);
                    *bytes = 0;
                }
                inner.window_start = Some(now);
            }
            Some(_) => {}
        }
        if self.kind == MediaKind::Video {
            inner.caches[layer_index].push(&packet, keyframe_start);
        }
        let mut closed = false;
        for sink in &inner.sinks {
            if sink.wanted_layers.load(Ordering::Relaxed) & (1 << layer) == 0 {
                continue;
            }
            let item = ForwardPacket {
                layer,
                keyframe_start,
                packet: packet.clone(),
            };
            match sink.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.counters.packets_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
            }
        }
        if closed {
            inner.sinks.retain(|sink| !sink.tx.is_closed());
        }
    }

    /// Attaches a subscriber. Returns the cached GOP of `replay_layer` to send first; it and the
    /// live packets that follow are contiguous (both happen under one lock).
    pub fn attach(&self, sink: Arc<Sink>, replay_layer: Option<u8>) -> Vec<ForwardPacket> {
        let mut inner = self.inner.lock();
        let replay = match replay_layer {
            Some(layer) if usize::from(layer) < LAYERS_MAX => inner.caches[usize::from(layer)]
                .snapshot()
                .into_iter()
                .enumerate()
                .map(|(i, packet)| ForwardPacket {
                    layer,
                    keyframe_start: i == 0,
                    packet,
                })
                .collect(),
            _ => Vec::new(),
        };
        inner.sinks.push(sink);
        replay
    }

    /// Attaches a relay to another node: every layer's cached GOP comes first (lowest layer
    /// first), then the live packets of every layer the sink wants.
    pub fn attach_all(&self, sink: Arc<Sink>) -> Vec<ForwardPacket> {
        let mut inner = self.inner.lock();
        let mut replay = Vec::new();
        for layer in 0..self.layer_count().min(LAYERS_MAX) {
            let cached = inner.caches[layer].snapshot();
            replay.extend(cached.into_iter().enumerate().map(|(i, packet)| ForwardPacket {
                layer: layer as u8,
                keyframe_start: i == 0,
                packet,
            }));
        }
        inner.sinks.push(sink);
        replay
    }

    pub fn detach(&self, sink: &Arc<Sink>) {
        self.inner.lock().sinks.retain(|s| !Arc::ptr_eq(s, sink));
    }

    pub fn sink_count(&self) -> usize {
        self.inner.lock().sinks.len()
    }

    /// Bitrate and liveness of each layer, lowest first.
    pub fn layer_views(&self, now: Instant) -> Vec<LayerView> {
        let now_ms = self.now_ms(now);
        (0..self.layer_count())
            .map(|i| {
                let meter = &self.meters[i];
                let last = meter.last_packet_ms.load(Ordering::Relaxed);
                LayerView {
                    bitrate_bps: meter.bitrate_bps.load(Ordering::Relaxed),
                    alive: last != 0 && now_ms.saturating_sub(last) <= LAYER_ALIVE_WINDOW.as_millis() as u64,
                }
            })
            .collect()
    }

    /// Asks the publisher for a keyframe on `layer`, at most once per interval per layer.
    pub fn request_keyframe(&self, layer: u8, now: Instant) {
        let Some(meter) = self.meters.get(usize::from(layer)) else {
            return;
        };
        let ssrc = meter.ssrc.load(Ordering::Relaxed);
        if ssrc == 0 || self.kind != MediaKind::Video {
            return;
        }
        let now_ms = self.now_ms(now).max(1);
        let last = &self.last_keyframe_request_ms[usize::from(layer)];
        let previous = last.load(Ordering::Relaxed);
        if previous != 0 && now_ms.saturating_sub(previous) < UPSTREAM_KEYFRAME_INTERVAL_MS {
            return;
        }
        if last
            .compare_exchange(previous, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.keyframe_tx.try_send(ssrc).is_ok()
        {
            self.counters.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Orders simulcast rids from lowest to highest layer. Browsers and WHIP clients name them
/// `q/h/f`, `l/m/h`, `low/mid/high` or `0/1/2`; unknown schemes keep the offer's order, which
/// by convention lists the lowest layer first.
pub fn order_rids(mut rids: Vec<String>) -> Vec<String> {
    let has = |name: &str| rids.iter().any(|r| r.eq_ignore_ascii_case(name));
    let quarter_half_full = has("q") || has("f");
    let rank = |rid: &str| -> Option<u8> {
        match rid.to_ascii_lowercase().as_str() {
            "q" | "l" | "low" | "0" | "lo" => Some(0),
            "m" | "mid" | "1" | "medium" => Some(1),
            "h" if quarter_half_full => Some(1),
            "h" | "f" | "high" | "hi" | "2" | "full" => Some(2),
            _ => None,
        }
    };
    if rids.iter().all(|r| rank(r).is_some()) {
        rids.sort_by_key(|r| rank(r));
    }
    rids.truncate(LAYERS_MAX);
    rids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rid_orders() {
        assert_eq!(order_rids(names(&["f", "h", "q"])), names(&["q", "h", "f"]));
        assert_eq!(order_rids(names(&["h", "m", "l"])), names(&["l", "m", "h"]));
        assert_eq!(order_rids(names(&["2", "0", "1"])), names(&["0", "1", "2"]));
        assert_eq!(order_rids(names(&["b", "a"])), names(&["b", "a"]));
    }

    #[tokio::test]
    async fn fanout_respects_wanted_layers_and_replays_gop() {
        let (keyframe_tx, mut keyframe_rx) = mpsc::channel(4);
        let track = PublishedTrack::new(
            "t".into(),
            Codec::Vp8,
            String::new(),
            0,
            names(&["q", "h"]),
            keyframe_tx,
            Arc::default(),
        );
        track.set_layer_ssrc(1, 77);
        let now = Instant::now();
        let keyframe = rtp::Packet {
            payload: vec![0x10, 0x00].into(),
            ..Default::default()
        };
        let delta = rtp::Packet {
            payload: vec![0x10, 0x01].into(),
            ..Default::default()
        };
        track.ingest(1, keyframe.clone(), now);
        track.ingest(1, delta.clone(), now);

        let (sink, mut rx) = Sink::new(0b01);
        let replay = track.attach(sink.clone(), Some(1));
        assert_eq!(replay.len(), 2);
        assert!(replay[0].keyframe_start && !replay[1].keyframe_start);
        track.ingest(1, delta.clone(), now);
        track.ingest(0, delta.clone(), now);
        let got = rx.try_recv().expect("layer 0 is wanted");
        assert_eq!(got.layer, 0);
        assert!(rx.try_recv().is_err(), "layer 1 was not wanted");

        track.request_keyframe(1, now);
        track.request_keyframe(1, now);
        assert_eq!(keyframe_rx.try_recv().ok(), Some(77));
        assert!(keyframe_rx.try_recv().is_err(), "second request is throttled");

        drop(rx);
        track.ingest(0, delta.clone(), now);
        assert_eq!(track.sink_count(), 0, "closed sinks are removed");

        // Sequence gaps at ingress are counted once; late and duplicate packets are not losses.
        let counters = Arc::clone(&track.counters);
        let before = counters.packets_lost.load(Ordering::Relaxed);
        for sequence in [1u16, 2, 5, 3, 5, 6] {
            let mut packet = delta.clone();
            packet.header.sequence_number = sequence;
            track.ingest(0, packet, now);
        }
        assert_eq!(counters.packets_lost.load(Ordering::Relaxed) - before, 2);
    }
}
