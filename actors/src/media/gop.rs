//! Keyframe cache: the packets of the latest group of pictures of one layer, from its keyframe
//! to now, so a new subscriber's first frame needs no round trip to the publisher.

use rtc::rtp;

/// Packets kept per layer before the cache gives up on the current GOP.
pub const GOP_PACKETS_MAX: usize = 4_096;
/// Payload bytes kept per layer before the cache gives up on the current GOP.
pub const GOP_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct GopCache {
    packets: Vec<rtp::Packet>,
    bytes: usize,
    /// False until a keyframe start arrives, and again after an overflow.
    complete: bool,
}

impl GopCache {
    pub fn push(&mut self, packet: &rtp::Packet, keyframe_start: bool) {
        if keyframe_start {
            self.packets.clear();
            self.bytes = 0;
            self.complete = true;
        }
        if !self.complete {
            return;
        }
        let size = packet.payload.len();
        if self.packets.len() >= GOP_PACKETS_MAX || self.bytes + size > GOP_BYTES_MAX {
            // A GOP longer than the cache: drop it whole rather than serve its tail.
            self.packets.clear();
            self.bytes = 0;
            self.complete = false;
            return;
        }
        self.packets.push(packet.clone());
        self.bytes += size;
    }

    /// The cached GOP, starting with its keyframe; empty when there is none.
    pub fn snapshot(&self) -> Vec<rtp::Packet> {
        if self.complete {
            self.packets.clone()
        } else {
            Vec::new()
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.packets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(sequence_number: u16, size: usize) -> rtp::Packet {
        let mut packet = rtp::Packet {
            payload: vec![0u8; size].into(),
            ..Default::default()
        };
        packet.header.sequence_number = sequence_number;
        packet
    }

    #[test]
    fn keeps_from_latest_keyframe() {
        let mut cache = GopCache::default();
        cache.push(&packet(1, 10), false);
        assert!(cache.snapshot().is_empty(), "nothing before the first keyframe");
        cache.push(&packet(2, 10), true);
        cache.push(&packet(3, 10), false);
        assert_eq!(
            cache
                .snapshot()
                .iter()
                .map(|p| p.header.sequence_number)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        cache.push(&packet(4, 10), true);
        assert_eq!(cache.snapshot().len(), 1);
    }

    #[test]
    fn overflow_drops_the_gop() {
        let mut cache = GopCache::default();
        cache.push(&packet(0, 10), true);
        for i in 1..GOP_PACKETS_MAX as u16 + 5 {
            cache.push(&packet(i, 1), false);
        }
        assert!(cache.snapshot().is_empty());
        assert!(cache.len() <= GOP_PACKETS_MAX);
        cache.push(&packet(9, 10), true);
        assert_eq!(cache.snapshot().len(), 1);
    }
}
